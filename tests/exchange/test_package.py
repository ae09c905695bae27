"""What goes to a partner: conditional updates on business identifiers, urn:uuid references, labels and notice."""

from __future__ import annotations

from typing import Any

from iop_fhir.exchange import package
from iop_fhir.mapping import ids

PATIENT_ID = "9f4cb7d0-0db2-5ddc-9703-29499c0e8028"
TASK_ID = "1b9a4c2e-8d7f-5e6a-9b0c-2d3e4f5a6b7c"


def record_identifier(value: str) -> dict[str, str]:
    return {"system": ids.RECORD_SYSTEM, "value": value}


def resources() -> list[dict[str, Any]]:
    patient = {
        "resourceType": "Patient",
        "id": PATIENT_ID,
        "meta": {
            "versionId": "3",
            "lastUpdated": "2026-03-27T10:00:00Z",
            "profile": ["p"],
            "security": [{"code": "R"}],
        },
        "identifier": [{"system": "urn:oid:1.2.3", "value": "MRN-1"}, record_identifier("enrollment/e1/patient")],
    }
    task = {
        "resourceType": "Task",
        "id": TASK_ID,
        "identifier": [record_identifier("discharge/d1/referral-task")],
        "for": {"reference": f"Patient/{PATIENT_ID}/_history/3"},
        "owner": {"reference": "Organization/passaic-valley-recovery"},
    }
    return [patient, task]


def test_every_entry_is_a_conditional_update_on_the_record_identifier() -> None:
    bundle = package.transaction(resources())
    assert bundle["type"] == "transaction"
    urls = [e["request"]["url"] for e in bundle["entry"]]
    assert urls == [
        "Patient?identifier=https://iop-fhir.org/fhir/sid/iop-record|enrollment/e1/patient",
        "Task?identifier=https://iop-fhir.org/fhir/sid/iop-record|discharge/d1/referral-task",
    ]
    assert all(e["request"]["method"] == "PUT" for e in bundle["entry"])
    assert all("id" not in e["resource"] for e in bundle["entry"])


def test_references_inside_the_package_become_urn_uuids_and_others_stay() -> None:
    bundle = package.transaction(resources())
    task = bundle["entry"][1]["resource"]
    assert bundle["entry"][0]["fullUrl"] == f"urn:uuid:{PATIENT_ID}"
    assert task["for"]["reference"] == f"urn:uuid:{PATIENT_ID}"
    assert task["owner"]["reference"] == "Organization/passaic-valley-recovery"


def test_server_meta_is_dropped_and_labels_kept() -> None:
    patient = package.transaction(resources())["entry"][0]["resource"]
    assert patient["meta"] == {"profile": ["p"], "security": [{"code": "R"}]}


def test_bundle_carries_the_labels_and_the_redisclosure_notice() -> None:
    labels = [{"system": package.ACT_CODE, "code": "42CFRPart2"}]
    bundle = package.transaction(resources(), labels=labels)
    codes = [s["code"] for s in bundle["meta"]["security"]]
    assert codes == ["42CFRPart2", "RedisclosureProhibitionMark"]
    notice = bundle["meta"]["security"][1]["extension"][0]["valueString"]
    assert notice.startswith("This record which has been disclosed to you is protected by Federal confidentiality")


def test_practitioner_is_matched_by_npi_and_the_source_resources_are_untouched() -> None:
    practitioner = {
        "resourceType": "Practitioner",
        "id": "5d1b6a3c-0000-5000-8000-000000000001",
        "identifier": [{"system": package.NPI, "value": "1234567893"}],
    }
    before = resources() + [practitioner]
    snapshot = [dict(r) for r in before]
    bundle = package.transaction(before)
    assert bundle["entry"][2]["request"]["url"] == "Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|1234567893"
    assert before == snapshot


def test_an_organization_named_by_its_own_id_gets_a_urn_and_references_to_it_follow() -> None:
    organization = {
        "resourceType": "Organization",
        "id": "passaic-valley-recovery",
        "identifier": [{"system": "https://iop-fhir.org/fhir/sid/partner", "value": "passaic-valley-recovery"}],
        "name": "Passaic Valley Recovery Services",
    }
    task = {
        "resourceType": "Task",
        "id": "0b0c5c1e-1111-5000-8000-000000000009",
        "identifier": [{"system": "https://iop-fhir.org/fhir/sid/iop-record", "value": "discharge/d1/referral-task"}],
        "owner": {"reference": "Organization/passaic-valley-recovery"},
    }
    bundle = package.transaction([organization, task])
    org_entry, task_entry = bundle["entry"]
    assert org_entry["fullUrl"].startswith("urn:uuid:")
    assert org_entry["fullUrl"] == package.transaction([organization])["entry"][0]["fullUrl"], "deterministic"
    assert task_entry["resource"]["owner"]["reference"] == org_entry["fullUrl"]
    assert "id" not in org_entry["resource"]
    # a resource without a business identifier is sent to its own id, under that id
    plain = {"resourceType": "Organization", "id": "no-identifier", "name": "x"}
    [entry] = package.transaction([plain])["entry"]
    assert (entry["fullUrl"], entry["request"]["url"]) == ("Organization/no-identifier", "Organization/no-identifier")
