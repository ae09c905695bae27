"""/iop/organization end to end on both databases: the program's one Organization recorded from the contract as it
is (201, then 200 unchanged), read back, refused naming the field, a US Core Organization under the project
profile; and the records written after it name it where FHIR expects the program (Encounter.serviceProvider, the
aftercare referral's requester, Consent.organization, EpisodeOfCare.managingOrganization, CarePlan.author), while
those written before stay as they were."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from auth import mint
from flask import Flask

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
CONTRACT = SHARED / "contract"
VALIDATOR = SHARED / "tools" / "fhir-validate"
PROFILE = "https://iop-fhir.org/fhir/StructureDefinition/"
US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition/"
NPI = "http://hl7.org/fhir/sid/us-npi"
EIN = "urn:oid:2.16.840.1.113883.4.4"
ORG_ID = "clifton-recovery-center"
PROGRAM = {
    "reference": f"Organization/{ORG_ID}",
    "display": "Clifton Recovery Center Intensive Outpatient Program",
}


def contract(name: str, enrollment_id: str | None = None) -> dict[str, Any]:
    text = (CONTRACT / f"{name}.json").read_text(encoding="utf-8")
    if enrollment_id is not None:
        text = text.replace("{{enrollment_id}}", enrollment_id)
    payload: dict[str, Any] = json.loads(text)
    return payload


def read(client: Any, reference: str) -> dict[str, Any]:
    response = client.get(f"/fhir/{reference}")
    assert response.status_code == 200, reference
    body: dict[str, Any] = response.get_json()
    return body


def one(client: Any, body: dict[str, Any], res_type: str) -> dict[str, Any]:
    (reference,) = [r for r in body["fhir"] if r.startswith(f"{res_type}/")]
    return read(client, reference)


def created(client: Any, plural: str, payload: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"/iop/{plural}", json=payload)
    assert response.status_code == 201, response.get_json()
    body: dict[str, Any] = response.get_json()
    return body


def outcome(response: Any) -> tuple[int, str, list[str] | None]:
    issue = response.get_json()["issue"][0]
    return response.status_code, issue["code"], issue.get("expression")


@pytest.fixture
def organization(client: Any) -> dict[str, Any]:
    response = client.put("/iop/organization", json=contract("organization"))
    assert response.status_code == 201, response.get_json()
    body: dict[str, Any] = response.get_json()
    return body


@pytest.fixture
def enrollment_id(client: Any) -> str:
    """A partner (the aftercare provider of the discharge contract) and an enrollment."""
    created(client, "partners", contract("partner"))
    return str(created(client, "enrollments", contract("enrollment"))["id"])


# -- the record ---------------------------------------------------------------------------------------------------


def test_contract_is_accepted_as_it_is_and_a_replay_changes_nothing(client: Any) -> None:
    payload = contract("organization")
    first = client.put("/iop/organization", json=payload)
    assert first.status_code == 201, first.get_json()
    body = first.get_json()
    assert {k: body[k] for k in payload} == payload
    assert body["fhir"][0] == f"Organization/{ORG_ID}"
    assert body["meta"]["version"] == 1
    again = client.put("/iop/organization", json=payload)
    assert again.status_code == 200
    assert again.get_json()["meta"] == body["meta"]
    assert read(client, f"Organization/{ORG_ID}")["meta"]["versionId"] == "1"


def test_get_before_any_put_is_404_with_an_operation_outcome(client: Any) -> None:
    response = client.get("/iop/organization")
    assert response.status_code == 404
    assert response.get_json()["resourceType"] == "OperationOutcome"
    assert response.get_json()["issue"][0]["code"] == "not-found"


def test_get_returns_the_recorded_organization(client: Any, organization: dict[str, Any]) -> None:
    response = client.get("/iop/organization")
    assert response.status_code == 200
    assert response.get_json() == organization


def test_put_with_other_content_replaces_it_as_a_new_version(client: Any, organization: dict[str, Any]) -> None:
    payload = {**contract("organization"), "phone": "+1-973-555-0111"}
    response = client.put("/iop/organization", json=payload)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["meta"]["version"] == 2
    resource = read(client, f"Organization/{ORG_ID}")
    assert resource["telecom"] == [{"system": "phone", "value": "+1-973-555-0111", "use": "work"}]
    assert resource["meta"]["versionId"] == "2"


def test_put_accepts_the_organization_as_it_was_read(client: Any, organization: dict[str, Any]) -> None:
    response = client.put("/iop/organization", json=organization)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["meta"]["version"] == 1


def test_put_with_another_id_is_a_conflict_naming_the_id(client: Any, organization: dict[str, Any]) -> None:
    response = client.put("/iop/organization", json={**contract("organization"), "id": "another-program"})
    assert outcome(response) == (409, "business-rule", ["id"])
    assert client.get("/fhir/Organization/another-program").status_code == 404
    assert client.get("/iop/organization").get_json()["id"] == ORG_ID


DELETE = object()


@pytest.mark.parametrize(
    ("field", "value", "code", "expression"),
    [
        ("npi", "1780680034", "value", "npi"),  # the Luhn check digit of 1780680033 is 3
        ("npi", "178068003", "value", "npi"),
        ("tax_id", "22-12345", "value", "tax_id"),
        ("name", DELETE, "required", "name"),
        ("id", "not an id", "value", "id"),
        ("programs", ["adult-sud", "adult-sud"], "invariant", "programs[1]"),
        ("programs", ["geriatric-sud"], "code-invalid", "programs[0]"),
        ("part2_program", "yes", "structure", "part2_program"),
        ("website", "https://clifton.example", "structure", "website"),
    ],
)
def test_bad_input_is_refused_naming_the_field_and_changes_nothing(
    client: Any, field: str, value: Any, code: str, expression: str
) -> None:
    payload = copy.deepcopy(contract("organization"))
    if value is DELETE:
        del payload[field]
    else:
        payload[field] = value
    response = client.put("/iop/organization", json=payload)
    assert outcome(response) == (400, code, [expression]), response.get_json()
    assert client.get("/iop/organization").status_code == 404


def test_the_organization_is_a_us_core_organization_of_the_project_profile(
    client: Any, organization: dict[str, Any]
) -> None:
    resource = read(client, f"Organization/{ORG_ID}")
    assert resource["meta"]["profile"] == [PROFILE + "iop-program-organization", US_CORE + "us-core-organization"]
    identifiers = {i["system"]: i["value"] for i in resource["identifier"]}
    assert (identifiers[NPI], identifiers[EIN]) == ("1780680033", "22-1234567")
    assert resource["active"] is True
    assert resource["type"][0]["coding"][0]["code"] == "prov"
    assert resource["address"][0]["postalCode"] == "07014"
    extensions = [
        (e["url"].removeprefix(PROFILE), e.get("valueBoolean", e.get("valueCodeableConcept")))
        for e in resource["extension"]
    ]
    assert extensions[0] == ("part2-program", True)
    assert [v["coding"][0]["code"] for url, v in extensions[1:] if url == "program-offered"] == [
        "program-adult-sud",
        "program-adolescent-sud",
    ]


@pytest.mark.peers
def test_the_stored_organization_passes_the_independent_validator(client: Any, organization: dict[str, Any]) -> None:
    resource = read(client, f"Organization/{ORG_ID}")
    result = subprocess.run(
        [str(VALIDATOR), "-"], input=json.dumps(resource), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_partner_reads_the_program_organization_as_it_reads_partner_organizations(
    app: Flask, client: Any, organization: dict[str, Any], enrollment_id: str
) -> None:
    token = mint(app, "system/*.rs", partner="passaic-valley-recovery", purpose="TREAT")
    headers = {"Authorization": f"Bearer {token}"}
    program = client.get(f"/fhir/Organization/{ORG_ID}", headers=headers)
    partner = client.get("/fhir/Organization/passaic-valley-recovery", headers=headers)
    assert program.status_code == partner.status_code


# -- the records that name it ------------------------------------------------------------------------------------


def test_records_written_after_it_reference_the_organization(
    client: Any, organization: dict[str, Any], enrollment_id: str
) -> None:
    episode = one(client, client.get(f"/iop/enrollments/{enrollment_id}").get_json(), "EpisodeOfCare")
    assert episode["managingOrganization"] == PROGRAM
    session = created(client, "sessions", contract("session", enrollment_id))
    assert one(client, session, "Encounter")["serviceProvider"] == PROGRAM
    consent = created(client, "consents", contract("consent", enrollment_id))
    assert one(client, consent, "Consent")["organization"] == [PROGRAM]
    plan = created(client, "treatment-plans", contract("treatment-plan", enrollment_id))
    assert one(client, plan, "CarePlan")["author"] == PROGRAM
    discharge = created(client, "discharges", contract("discharge", enrollment_id))
    referral, task = one(client, discharge, "ServiceRequest"), one(client, discharge, "Task")
    assert referral["requester"] == task["requester"] == PROGRAM
    assert referral["performer"][0]["reference"] == task["owner"]["reference"] == "Organization/passaic-valley-recovery"
    plans = [read(client, r) for r in discharge["fhir"] if r.startswith("CarePlan/")]
    (continuing_care,) = [p for p in plans if p["title"].startswith("Continuing care")]
    assert continuing_care["author"] == PROGRAM
    # The discharge re-maps the episode to close it: it still names the organization.
    closed = read(client, f"EpisodeOfCare/{episode['id']}")
    assert (closed["status"], closed["managingOrganization"]) == ("finished", PROGRAM)


def test_records_written_before_it_stay_as_they_were(client: Any, enrollment_id: str) -> None:
    session = created(client, "sessions", contract("session", enrollment_id))
    encounter = one(client, session, "Encounter")
    assert "serviceProvider" not in encounter
    discharge_payload = contract("discharge", enrollment_id)
    created(client, "treatment-plans", contract("treatment-plan", enrollment_id))
    discharge = created(client, "discharges", discharge_payload)
    assert one(client, discharge, "ServiceRequest")["requester"] == {"display": "Intensive outpatient program"}
    assert client.put("/iop/organization", json=contract("organization")).status_code == 201
    # Existing resources are not rewritten; records written from now on name the organization.
    assert read(client, f"Encounter/{encounter['id']}") == encounter
    later = {**contract("session", enrollment_id), "start": "2026-02-18T18:00:00-05:00"}
    later["end"] = "2026-02-18T21:00:00-05:00"
    assert one(client, created(client, "sessions", later), "Encounter")["serviceProvider"] == PROGRAM


def test_each_attendee_of_a_group_session_has_the_organization_as_service_provider(
    client: Any, organization: dict[str, Any]
) -> None:
    text = (CONTRACT / "group-session.json").read_text(encoding="utf-8")
    for n, placeholder in enumerate(("{{enrollment_id_2}}", "{{enrollment_id_3}}", "{{enrollment_id}}")):
        enrollment = contract("enrollment")
        enrollment["patient"]["identifiers"][0]["value"] = f"MRN-ORG-{n}"
        text = text.replace(placeholder, str(created(client, "enrollments", enrollment)["id"]))
    group = created(client, "group-sessions", json.loads(text))
    encounters = [read(client, r) for r in group["fhir"] if r.startswith("Encounter/")]
    assert len(encounters) == 3
    assert all(e["serviceProvider"] == PROGRAM for e in encounters)
