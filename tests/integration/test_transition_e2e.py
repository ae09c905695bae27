"""A transition end to end against an independent FHIR server playing the aftercare provider
(../shared/tools/ehr-server): the worker delivers the package, replays never duplicate it, and the partner's Task
status comes back to the discharge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests

from iop_fhir.exchange import followup
from iop_fhir.exchange.partners import client_for
from iop_fhir.mapping import ids
from iop_fhir.runtime import run_worker
from tests.auth import admin_token

SHARED = Path(__file__).resolve().parents[3] / "shared"
CONTRACT = SHARED / "contract"

pytestmark = pytest.mark.peers


@pytest.fixture
def aftercare(ehr_server: str) -> str:
    root = ehr_server.split("/fhir")[0]
    requests.post(f"{root}/_reset", timeout=10)
    return ehr_server


def contract(kind: str, enrollment_id: str | None = None) -> dict[str, Any]:
    text = (CONTRACT / f"{kind}.json").read_text(encoding="utf-8")
    payload: dict[str, Any] = json.loads(text.replace("{{enrollment_id}}", enrollment_id or ""))
    return payload


def at_partner(base: str, res_type: str, identifier: str) -> list[dict[str, Any]]:
    bundle = requests.get(f"{base}/{res_type}", params={"identifier": identifier}, timeout=10).json()
    return [e["resource"] for e in bundle.get("entry", [])]


def discharge_with_referral(client: Any, base: str) -> dict[str, Any]:
    partner = contract("partner")
    partner.update(fhir_base_url=base, auth={"type": "none"})
    assert client.post("/iop/partners", json=partner).status_code == 201
    enrollment_id = client.post("/iop/enrollments", json=contract("enrollment")).get_json()["id"]
    assert client.post("/iop/treatment-plans", json=contract("treatment-plan", enrollment_id)).status_code == 201
    consent = contract("consent", enrollment_id)
    del consent["expires_on"]  # in force whenever the test runs (consents are decided on the day)
    assert client.post("/iop/consents", json=consent).status_code == 201
    response = client.post("/iop/discharges", json=contract("discharge", enrollment_id))
    assert response.status_code == 201, response.get_json()
    body: dict[str, Any] = response.get_json()
    return body


def test_transition_arrives_once_and_the_partners_task_status_comes_back(app: Any, client: Any, aftercare: str) -> None:
    store = app.extensions["iop_fhir.store"]
    settings = app.config["IOP_FHIR"]
    discharge = discharge_with_referral(client, aftercare)
    assert discharge["transition"]["delivery"]["status"] == "pending"

    assert run_worker(settings, once=True, store=store) == 0
    rows, _ = store.deliveries(record_id=discharge["id"])
    assert [r.status for r in rows] == ["delivered"], [r.last_error for r in rows]

    task_identifier = f"{ids.RECORD_SYSTEM}|{ids.identifier_value('discharge', discharge['id'], 'referral-task')}"
    tasks = at_partner(aftercare, "Task", task_identifier)
    assert len(tasks) == 1
    task = tasks[0]
    assert task["status"] == "requested"
    service_request = requests.get(f"{aftercare}/{task['focus']['reference']}", timeout=10).json()
    assert service_request["resourceType"] == "ServiceRequest"
    patient = requests.get(f"{aftercare}/{task['for']['reference']}", timeout=10).json()
    assert patient["name"][0]["family"] == "Reyes"
    consents = requests.get(f"{aftercare}/Consent", params={"patient": task["for"]["reference"]}, timeout=10).json()
    assert len(consents.get("entry", [])) == 1

    # Replaying the delivery (an operator retry, or a PUT of the discharge) leaves one copy at the partner.
    assert client.put(f"/iop/discharges/{discharge['id']}", json=discharge).status_code == 200
    assert run_worker(settings, once=True, store=store) == 0
    assert len(at_partner(aftercare, "Task", task_identifier)) == 1
    for res_type in ("Patient", "ServiceRequest", "CarePlan", "Consent"):
        assert len(requests.get(f"{aftercare}/{res_type}", timeout=10).json().get("entry", [])) == 1, res_type

    # The aftercare provider accepts the referral; following the Task brings that back.
    task = at_partner(aftercare, "Task", task_identifier)[0]
    task["status"] = "accepted"
    task["businessStatus"] = {
        "coding": [{"system": "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS", "code": "3.0"}]
    }
    assert requests.put(f"{aftercare}/Task/{task['id']}", json=task, timeout=10).status_code == 200
    repository = app.extensions["iop_fhir.repository"]
    assert followup.follow(repository, settings, client_for) == 1
    shown = client.get(f"/iop/discharges/{discharge['id']}").get_json()["transition"]
    assert shown["task"]["status"] == "accepted"
    assert shown["task"]["business_status"]["code"] == "3.0"
    assert followup.follow(repository, settings, client_for) == 0


def test_partner_that_refuses_the_package_leaves_a_dead_letter_with_its_outcome(
    app: Any, client: Any, aftercare: str
) -> None:
    store = app.extensions["iop_fhir.store"]
    settings = app.config["IOP_FHIR"]
    discharge = discharge_with_referral(client, aftercare + "/no-such-base")
    run_worker(settings, once=True, store=store)
    rows, _ = store.deliveries(record_id=discharge["id"])
    # A 4xx other than 429 is permanent: dead at the first attempt, the partner's OperationOutcome kept.
    assert [(r.status, r.attempts) for r in rows] == [("dead", 1)]
    assert rows[0].last_error is not None and rows[0].last_error["status"] == 400
    assert rows[0].last_error["outcome"]["resourceType"] == "OperationOutcome"
    listed = client.get("/iop/deliveries?status=dead").get_json()
    assert [d["id"] for d in listed["items"]] == [rows[0].id]


def disclosures_audited(app: Any) -> list[dict[str, Any]]:
    """The worker's AuditEvents of disclosures, as an administrator's search of /fhir/AuditEvent finds them (the API
    audits its own interactions beside them)."""
    admin = app.test_client()
    admin.token = admin_token(app)
    response = admin.get("/fhir/AuditEvent?type=110106&_count=500")
    assert response.status_code == 200, response.get_json()
    events = [e["resource"] for e in response.get_json().get("entry", [])]
    return [
        e for e in events if any(a["who"].get("identifier", {}).get("value") == "iop-fhir-worker" for a in e["agent"])
    ]


def everything_at(base: str) -> dict[str, list[dict[str, Any]]]:
    """Every resource of the types a package holds, as the partner has them."""
    found = {}
    for res_type in ("Patient", "CarePlan", "ServiceRequest", "Task", "Consent"):
        bundle = requests.get(f"{base}/{res_type}", timeout=10).json()
        found[res_type] = [e["resource"] for e in bundle.get("entry", [])]
    return found


def test_a_transition_waits_for_consent_goes_once_consented_and_stops_once_revoked(
    app: Any, client: Any, aftercare: str
) -> None:
    store = app.extensions["iop_fhir.store"]
    settings = app.config["IOP_FHIR"]
    partner = contract("partner")
    partner.update(fhir_base_url=aftercare, auth={"type": "none"})
    assert client.post("/iop/partners", json=partner).status_code == 201
    enrollment_id = client.post("/iop/enrollments", json=contract("enrollment")).get_json()["id"]
    assert client.post("/iop/treatment-plans", json=contract("treatment-plan", enrollment_id)).status_code == 201
    discharge = client.post("/iop/discharges", json=contract("discharge", enrollment_id)).get_json()
    assert discharge["transition"]["delivery"]["status"] == "blocked"

    # Without consent nothing reaches the aftercare provider, not even that the patient exists.
    assert run_worker(settings, once=True, store=store) == 0
    assert everything_at(aftercare) == {t: [] for t in ("Patient", "CarePlan", "ServiceRequest", "Task", "Consent")}

    consent_payload = contract("consent", enrollment_id)
    del consent_payload["expires_on"]  # in force whenever the test runs
    consent = client.post("/iop/consents", json=consent_payload).get_json()
    assert run_worker(settings, once=True, store=store) == 0
    rows, _ = store.deliveries(record_id=discharge["id"])
    assert [r.status for r in rows] == ["superseded", "delivered"], [r.last_error for r in rows]
    delivered = everything_at(aftercare)
    assert {t: len(found) for t, found in delivered.items()} == dict.fromkeys(delivered, 1)
    # the recipient is the partner's Organization, sent with the package and resolved by the receiver
    recipient = delivered["Consent"][0]["provision"]["actor"][0]["reference"]["reference"]
    organization = requests.get(f"{aftercare}/{recipient}", timeout=10).json()
    assert {"system": "https://iop-fhir.org/fhir/sid/partner", "value": "passaic-valley-recovery"} in organization[
        "identifier"
    ]
    assert len(disclosures_audited(app)) == 1

    # The patient revokes the consent; a later change to the discharge is not disclosed.
    revoked = client.post(f"/iop/consents/{consent['id']}/revoke", json={"revoked_on": "2026-11-30"})
    assert revoked.status_code == 200, revoked.get_json()
    changed = {k: v for k, v in discharge.items() if k not in ("id", "fhir", "meta", "transition")}
    changed["summary"] = "Completed 12 weeks; relapse prevention plan reviewed with family."
    assert client.put(f"/iop/discharges/{discharge['id']}", json=changed).status_code == 200
    assert run_worker(settings, once=True, store=store) == 0
    rows, _ = store.deliveries(record_id=discharge["id"])
    assert [r.status for r in rows] == ["superseded", "delivered", "blocked"]
    assert (rows[-1].last_error or {})["message"].startswith("blocked: no consent")
    assert everything_at(aftercare) == delivered
    assert len(disclosures_audited(app)) == 1
