"""The transition-of-care document end to end against an independent FHIR server playing the aftercare provider
(../shared/tools/ehr-server): a discharge of a patient with medications, two assessments and drug screens arrives as
one document beside the referral resources, exactly once however often it is replayed, and a corrected discharge
sends a document that replaces it."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from iop_fhir.exchange import document
from iop_fhir.runtime import run_worker
from tests.exchange.documents import DATA

pytestmark = pytest.mark.peers


@pytest.fixture
def aftercare(ehr_server: str) -> str:
    root = ehr_server.split("/fhir")[0]
    requests.post(f"{root}/_reset", timeout=10)
    return ehr_server


def documents_at(base: str) -> list[dict[str, Any]]:
    bundle = requests.get(f"{base}/Bundle", params={"_count": "100"}, timeout=10).json()
    return [e["resource"] for e in bundle.get("entry", []) if e["resource"].get("type") == "document"]


def save_completed_case(client: Any, base: str) -> dict[str, Any]:
    """The completed golden case, its partner at ``base``; the discharge as saved."""
    case = json.loads((DATA / "completed.json").read_text(encoding="utf-8"))
    enrollment_id = ""
    for item in case["records"]:
        body = json.loads(json.dumps(item["body"]).replace("{{enrollment_id}}", enrollment_id))
        if item["kind"] == "partners":
            body["fhir_base_url"] = base
        if item["kind"] == "organization":
            response = client.put("/iop/organization", json=body)
        else:
            response = client.post(f"/iop/{item['kind']}", json=body)
        assert response.status_code in (200, 201), response.get_json()
        if item["kind"] == "enrollments":
            enrollment_id = response.get_json()["id"]
    payload = json.loads(json.dumps(case["discharge"]).replace("{{enrollment_id}}", enrollment_id))
    response = client.post("/iop/discharges", json=payload)
    assert response.status_code == 201, response.get_json()
    saved: dict[str, Any] = response.get_json()
    return saved


def test_a_discharge_arrives_as_one_document_with_its_referral_once_and_a_correction_replaces_it(
    app: Any, client: Any, aftercare: str
) -> None:
    store = app.extensions["iop_fhir.store"]
    settings = app.config["IOP_FHIR"]
    discharge = save_completed_case(client, aftercare)

    assert run_worker(settings, once=True, store=store) == 0
    rows, _ = store.deliveries(record_id=discharge["id"])
    assert [r.status for r in rows] == ["delivered"], [r.last_error for r in rows]

    found = documents_at(aftercare)
    assert len(found) == 1
    sent = found[0]
    composition = sent["entry"][0]["resource"]
    assert composition["resourceType"] == "Composition"
    assert composition["type"]["coding"][0]["code"] == "18761-7"
    titles = {s["code"]["coding"][0]["code"]: s for s in composition["section"]}
    # Every section the records support has its entries: problems, medications, screens, scores, ASAM, plan.
    for code in ("11450-4", "10160-0", "30954-2", "behavioral_health_summary", "47420-5", "18776-5"):
        assert titles[code].get("entry"), code
    assert titles["42348-3"]["section"][0]["entry"][0]["reference"].startswith("Consent/")
    # The document as the receiver keeps it is the one sent, its references resolving inside it.
    queued = document.documents_in(rows[0].payload["body"])[0]
    assert sent["identifier"] == queued["identifier"]
    assert [e["fullUrl"] for e in sent["entry"]] == [e["fullUrl"] for e in queued["entry"]]
    assert composition == queued["entry"][0]["resource"]
    # Beside it, the referral resources, once each.
    for res_type in ("Patient", "ServiceRequest", "Task", "Consent", "CarePlan"):
        assert len(requests.get(f"{aftercare}/{res_type}", timeout=10).json().get("entry", [])) == 1, res_type

    # Replays (the same discharge saved again) leave the one document.
    assert client.put(f"/iop/discharges/{discharge['id']}", json=discharge).status_code == 200
    assert run_worker(settings, once=True, store=store) == 0
    assert [d["identifier"] for d in documents_at(aftercare)] == [sent["identifier"]]

    # A corrected discharge sends a new document replacing the first.
    corrected = {**discharge, "summary": "Completed 12 weeks; attended 35 of 36 group sessions."}
    assert client.put(f"/iop/discharges/{discharge['id']}", json=corrected).status_code == 200
    assert run_worker(settings, once=True, store=store) == 0
    rows, _ = store.deliveries(record_id=discharge["id"])
    assert all(r.status == "delivered" for r in rows), [r.last_error for r in rows]
    found = documents_at(aftercare)
    assert len(found) == 2
    newer = next(d for d in found if d["identifier"] != sent["identifier"])
    relates = newer["entry"][0]["resource"]["relatesTo"]
    assert relates == [{"code": "replaces", "targetIdentifier": sent["identifier"]}]
    assert "35 of 36" in newer["entry"][0]["resource"]["text"]["div"]
