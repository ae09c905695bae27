"""A transition end to end against an independent FHIR server playing the aftercare provider
(../shared/tools/ehr-server): the worker delivers the package, replays never duplicate it, and the partner's Task
status comes back to the discharge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests

from iop_fhir.exchange import followup, worker
from iop_fhir.exchange.client import client_for
from iop_fhir.mapping import ids

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
    assert client.post("/iop/consents", json=contract("consent", enrollment_id)).status_code == 201
    response = client.post("/iop/discharges", json=contract("discharge", enrollment_id))
    assert response.status_code == 201, response.get_json()
    body: dict[str, Any] = response.get_json()
    return body


def test_transition_arrives_once_and_the_partners_task_status_comes_back(app: Any, client: Any, aftercare: str) -> None:
    store = app.extensions["iop_fhir.store"]
    settings = app.config["IOP_FHIR"]
    discharge = discharge_with_referral(client, aftercare)
    assert discharge["transition"]["delivery"]["status"] == "pending"

    assert worker.run(settings, once=True, store=store) == 0
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
    assert worker.run(settings, once=True, store=store) == 0
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
    worker.run(settings, once=True, store=store)
    rows, _ = store.deliveries(record_id=discharge["id"])
    # A 4xx other than 429 is permanent: dead at the first attempt, the partner's OperationOutcome kept.
    assert [(r.status, r.attempts) for r in rows] == [("dead", 1)]
    assert rows[0].last_error is not None and rows[0].last_error["status"] == 400
    assert rows[0].last_error["outcome"]["resourceType"] == "OperationOutcome"
    listed = client.get("/iop/deliveries?status=dead").get_json()
    assert [d["id"] for d in listed["items"]] == [rows[0].id]
