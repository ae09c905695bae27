"""Referrals and sync end to end against an independent FHIR server (../shared/tools/ehr-server): as the referring
inpatient unit it receives each decision on its referral Task exactly once per Task, and as a hospital EHR it is
pulled from into the enrolled patient's record without duplicates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests

from iop_fhir import runtime
from iop_fhir.exchange import package, referrals, sync

SHARED = Path(__file__).resolve().parents[3] / "shared"
CONTRACT = SHARED / "contract"
BSER = "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS"
MRN_SYSTEM = "urn:oid:2.16.840.1.113883.19.5.99999.1"
REFERRAL_SYSTEM = "https://ehr.stjoseph.example/referrals"
ADMISSION = {"program": "adult-sud", "level_of_care": "2.1", "admission_date": "2026-02-09"}
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"

pytestmark = pytest.mark.peers


@pytest.fixture
def peer(ehr_server: str) -> str:
    """The ehr-server's FHIR base, emptied."""
    root = ehr_server.split("/fhir")[0]
    assert requests.post(f"{root}/_reset", timeout=10).status_code == 200
    return ehr_server


def contract(kind: str) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads((CONTRACT / f"{kind}.json").read_text(encoding="utf-8"))
    return payload


def search_at(base: str, res_type: str, **params: str) -> list[dict[str, Any]]:
    response = requests.get(f"{base}/{res_type}", params={**params, "_count": "100"}, timeout=10)
    assert response.status_code == 200, response.text
    return [e["resource"] for e in response.json().get("entry", [])]


def put_at(base: str, resource: dict[str, Any]) -> None:
    url = f"{base}/{resource['resourceType']}/{resource['id']}"
    response = requests.put(url, json=resource, headers={"Content-Type": "application/fhir+json"}, timeout=10)
    assert response.status_code in (200, 201), response.text


def run_worker(app: Any) -> None:
    assert runtime.run_worker(app.config["IOP_FHIR"], once=True, store=app.extensions["iop_fhir.store"]) == 0


def deliveries(app: Any, referral_id: str) -> list[Any]:
    rows, _ = app.extensions["iop_fhir.store"].deliveries(record_kind="referral", record_id=referral_id)
    return list(rows)


def business_status(task: dict[str, Any]) -> str:
    coding = task["businessStatus"]["coding"][0]
    assert coding["system"] == BSER
    return str(coding["code"])


# -- the referral loop: the ehr-server is the referring inpatient unit -----------------------------------------------


INPATIENT_UNIT = {
    "id": "st-joseph-detox",
    "kind": "inpatient-unit",
    "name": "St. Joseph Inpatient Detoxification Unit",
}


def referral_bundle(mrn: str = "MRN-552310", reference: str = "REF-2026-0419") -> dict[str, Any]:
    """The contract's inbound referral, its requester naming the inpatient unit partner by the partner identifier
    (referrals.partner_named), for the patient ``mrn`` and the referral ``reference``."""
    bundle = contract("inbound-referral-bundle")
    requester = {
        "identifier": {"system": package.PARTNER_SYSTEM, "value": INPATIENT_UNIT["id"]},
        "display": INPATIENT_UNIT["name"],
    }
    patient, _, service_request, task = bundle["entry"]
    patient["resource"]["identifier"][0]["value"] = mrn
    patient["request"]["ifNoneExist"] = f"identifier={MRN_SYSTEM}|{mrn}"
    service_request["resource"]["identifier"][0]["value"] = reference
    service_request["request"]["ifNoneExist"] = f"identifier={REFERRAL_SYSTEM}|{reference}"
    service_request["resource"]["requester"] = requester
    task["resource"]["requester"] = requester
    return bundle


def refer(client: Any, bundle: dict[str, Any]) -> str:
    """POST the referral to our /fhir; the referral's id (its Task's)."""
    response = client.post("/fhir", data=json.dumps(bundle), content_type="application/fhir+json")
    assert response.status_code == 200, response.get_json()
    task = next(e["response"]["location"] for e in response.get_json()["entry"] if "Task/" in e["response"]["location"])
    return str(task.split("Task/", 1)[1].split("/", 1)[0])


def tasks_at(base: str, referral_id: str) -> list[dict[str, Any]]:
    """The referral's Task at the referrer, by the identifier we send it with."""
    own = referrals.task_identifier(referral_id)
    return search_at(base, "Task", identifier=f"{own['system']}|{own['value']}")


def the_task_at(base: str, referral_id: str) -> dict[str, Any]:
    found = tasks_at(base, referral_id)
    assert len(found) == 1, [t.get("id") for t in found]
    return found[0]


@pytest.fixture
def inpatient_unit(client: Any, peer: str) -> str:
    partner = {**INPATIENT_UNIT, "fhir_base_url": peer, "auth": {"type": "none"}}
    assert client.post("/iop/partners", json=partner).status_code == 201
    return peer


def test_decisions_on_a_partners_referral_reach_its_task_once_accepted_then_completed(
    app: Any, client: Any, inpatient_unit: str
) -> None:
    base = inpatient_unit
    referral_id = refer(client, referral_bundle())
    listed = client.get("/iop/referrals").get_json()
    assert [r["id"] for r in listed["items"]] == [referral_id]
    referral = listed["items"][0]
    assert referral["status"] == "requested"
    assert referral["referring"] == {"organization": INPATIENT_UNIT["name"], "partner": INPATIENT_UNIT["id"]}
    assert search_at(base, "Task") == []  # nothing goes back before a decision

    response = client.post(f"/iop/referrals/{referral_id}/accept", json={"planned_admission": "2026-02-09"})
    assert response.status_code == 200, response.get_json()
    run_worker(app)
    rows = deliveries(app, referral_id)
    assert [(r.partner_id, r.status) for r in rows] == [(INPATIENT_UNIT["id"], "delivered")], [
        r.last_error for r in rows
    ]
    task = the_task_at(base, referral_id)
    assert (task["status"], business_status(task)) == ("accepted", "3.0")
    assert {"type": {"text": "planned admission"}, "valueDate": "2026-02-09"} in task["output"]
    assert task["focus"]["identifier"] == {"system": REFERRAL_SYSTEM, "value": "REF-2026-0419"}
    assert task["for"]["identifier"] == {"system": MRN_SYSTEM, "value": "MRN-552310"}

    # A delivered row is not retried by hand; replays come from the worker (at-least-once) and from later decisions.
    retried = client.post(f"/iop/deliveries/{rows[0].id}/retry")
    assert retried.status_code == 409
    assert retried.get_json()["issue"][0]["expression"] == ["status"]
    run_worker(app)
    assert len(tasks_at(base, referral_id)) == 1
    # The accepted delivery sent again as it is, as a worker that died before recording it would: still one Task.
    replayed = requests.post(base, json=rows[0].payload["body"], timeout=10)
    assert replayed.status_code == 200, replayed.text
    assert len(tasks_at(base, referral_id)) == 1

    # Rescheduling is another decision, delivered as an update of the same Task.
    response = client.post(f"/iop/referrals/{referral_id}/accept", json={"planned_admission": "2026-02-11"})
    assert response.status_code == 200, response.get_json()
    run_worker(app)
    task = the_task_at(base, referral_id)
    assert [o["valueDate"] for o in task["output"]] == ["2026-02-11"]

    response = client.post(f"/iop/referrals/{referral_id}/admit", json={"enrollment": ADMISSION})
    assert response.status_code == 200, response.get_json()
    admitted = response.get_json()
    assert admitted["status"] == "admitted"
    run_worker(app)
    # The admission discloses a treatment record: it waits for the enrolled patient's consent to the unit.
    rows = deliveries(app, referral_id)
    assert [r.status for r in rows] == ["delivered", "delivered", "blocked"], [r.last_error for r in rows]
    assert the_task_at(base, referral_id)["status"] == "accepted"
    consent = json.loads((CONTRACT / "consent.json").read_text(encoding="utf-8"))
    consent.update(enrollment_id=admitted["enrollment_id"], recipient=INPATIENT_UNIT["id"])
    del consent["expires_on"]  # in force whenever the test runs
    assert client.post("/iop/consents", json=consent).status_code == 201
    run_worker(app)
    rows = deliveries(app, referral_id)
    assert [r.status for r in rows] == ["delivered", "delivered", "superseded", "delivered"], [
        r.last_error for r in rows
    ]
    assert len(search_at(base, "Consent")) == 1
    task = the_task_at(base, referral_id)
    assert (task["status"], business_status(task)) == ("completed", "7.0")
    episodes = [o["valueReference"]["reference"] for o in task["output"] if o["type"]["text"] == "episode of care"]
    assert episodes == [f"http://testserver/fhir/{admitted['episode_of_care']}"]
    assert client.get(f"/fhir/{admitted['episode_of_care']}").status_code == 200

    run_worker(app)
    assert len(tasks_at(base, referral_id)) == 1
    assert len(search_at(base, "Task")) == 1


def test_a_declined_referral_reaches_the_partners_task_as_rejected_with_the_reason(
    app: Any, client: Any, inpatient_unit: str
) -> None:
    base = inpatient_unit
    first = refer(client, referral_bundle())
    second = refer(client, referral_bundle("MRN-552311", "REF-2026-0420"))
    assert first != second
    assert client.get("/iop/referrals").get_json()["total"] == 2

    assert client.post(f"/iop/referrals/{first}/accept", json={"planned_admission": "2026-02-09"}).status_code == 200
    reason = "Needs residential care (ASAM 3.5) first"
    response = client.post(f"/iop/referrals/{second}/decline", json={"reason": reason})
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["status"] == "declined"
    run_worker(app)
    assert [r.status for r in deliveries(app, second)] == ["delivered"]

    task = the_task_at(base, second)
    assert (task["status"], business_status(task)) == ("rejected", "4.0")
    assert task["statusReason"]["text"] == reason
    assert task["focus"]["identifier"] == {"system": REFERRAL_SYSTEM, "value": "REF-2026-0420"}
    assert the_task_at(base, first)["status"] == "accepted"  # each referral has its own Task there

    run_worker(app)
    assert len(tasks_at(base, second)) == 1
    assert len(search_at(base, "Task")) == 2


# -- sync: the ehr-server is the hospital EHR -------------------------------------------------------------------------


HOSPITAL = {
    "id": "st-joseph-ehr",
    "kind": "hospital-ehr",
    "name": "St. Joseph Regional Medical Center",
}
OUR_MRN = "MRN-448812"  # the enrollment contract's first patient identifier


def condition(rid: str, code: str, display: str, patient: str = "p-77") -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": rid,
        "clinicalStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]
        },
        "verificationStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]
        },
        "category": [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "problem-list-item"}
                ]
            }
        ],
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}]},
        "subject": {"reference": f"Patient/{patient}"},
    }


def lab(rid: str, value: float, patient: str = "p-77") -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "1742-6", "display": "ALT"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": "2026-01-04T08:00:00Z",
        "valueQuantity": {"value": value, "unit": "U/L", "system": "http://unitsofmeasure.org", "code": "U/L"},
    }


def seed_hospital(base: str) -> list[str]:
    """The hospital's record of the enrolled patient (p-77) and of another one (p-99); the ids of p-77's resources
    that sync pulls, as ``Type/id``."""
    for rid, mrn, family in (("p-77", OUR_MRN, "Reyes"), ("p-99", "MRN-990001", "Other")):
        put_at(
            base,
            {
                "resourceType": "Patient",
                "id": rid,
                "identifier": [{"system": MRN_SYSTEM, "value": mrn}],
                "name": [{"family": family, "given": ["Sam"]}],
            },
        )
    ours = [
        condition("c1", "7200002", "Alcoholism"),
        condition("c2", "35489007", "Depressive disorder"),
        {
            "resourceType": "MedicationRequest",
            "id": "m1",
            "status": "active",
            "intent": "order",
            "medicationCodeableConcept": {
                "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "1116632"}]
            },
            "subject": {"reference": "Patient/p-77"},
        },
        lab("o1", 31),
        lab("o2", 44),
    ]
    for resource in [*ours, lab("o-other", 12, patient="p-99")]:
        put_at(base, resource)
    return [f"{r['resourceType']}/{r['id']}" for r in ours]


def pulled(client: Any, base: str, patient: str) -> dict[str, dict[str, Any]]:
    """Our patient's resources that came from the hospital, by their meta.source, failing on any source seen twice
    (the enrollment made Conditions of its own: those have no source at the hospital)."""
    found: dict[str, dict[str, Any]] = {}
    for res_type, parameter in (("Condition", "subject"), ("MedicationRequest", "subject"), ("Observation", "patient")):
        bundle = client.get(f"/fhir/{res_type}?{parameter}=Patient/{patient}&_count=100").get_json()
        for entry in bundle.get("entry", []):
            resource = entry["resource"]
            source = resource["meta"].get("source", "")
            if source.startswith(base + "/"):
                assert source not in found, source
                assert resource["subject"] == {"reference": f"Patient/{patient}"}
                found[source] = resource
    return found


def sync_once(app: Any) -> sync.SyncReport:
    store, repository = app.extensions["iop_fhir.store"], app.extensions["iop_fhir.repository"]
    report = sync.sync_all(store, repository, app.config["IOP_FHIR"])
    assert report.ok, report.to_json()
    assert report.unmatched == []
    return report


def test_sync_pulls_the_enrolled_patients_record_from_the_hospital_once(app: Any, client: Any, peer: str) -> None:
    base = peer
    theirs = seed_hospital(base)
    partner = {**HOSPITAL, "fhir_base_url": base, "auth": {"type": "none"}}
    assert client.post("/iop/partners", json=partner).status_code == 201
    response = client.post("/iop/enrollments", json=contract("enrollment"))
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["patient"]["identifiers"][0]["value"] == OUR_MRN
    patient = next(r for r in response.get_json()["fhir"] if r.startswith("Patient/")).split("/", 1)[1]

    assert sync_once(app).to_json()["stored"] == 5
    found = pulled(client, base, patient)
    assert sorted(found) == sorted(f"{base}/{r}" for r in theirs)
    first = {source: resource["id"] for source, resource in found.items()}
    assert first[f"{base}/Condition/c1"] == sync.sync_id(HOSPITAL["id"], "Condition", "c1")
    everywhere = client.get("/fhir/Observation?_count=100").get_json().get("entry", [])
    assert f"{base}/Observation/o-other" not in [e["resource"]["meta"].get("source") for e in everywhere]

    put_at(base, condition("c3", "191816009", "Drug dependence"))
    assert sync_once(app).to_json()["stored"] == 1
    found = pulled(client, base, patient)
    assert sorted(found) == sorted(f"{base}/{r}" for r in [*theirs, "Condition/c3"])
    assert {s: r["id"] for s, r in found.items() if s in first} == first

    report = sync_once(app)
    assert report.to_json()["stored"] == 0
    found = pulled(client, base, patient)
    assert len(found) == 6
    assert {source: resource["meta"]["versionId"] for source, resource in found.items()} == dict.fromkeys(found, "1")
    for source in first:
        res_type, their_id = source.rsplit("/", 2)[-2:]
        history = client.get(f"/fhir/{res_type}/{sync.sync_id(HOSPITAL['id'], res_type, their_id)}/_history")
        assert history.status_code == 200
        assert history.get_json()["total"] == 1, source
