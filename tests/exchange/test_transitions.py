"""A discharge with a referral goes to the aftercare partner through the outbox, in the discharge's transaction."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from iop_fhir.exchange import package

CONTRACT = Path(__file__).resolve().parents[3] / "shared" / "contract"
VALIDATOR = Path(__file__).resolve().parents[3] / "shared" / "tools" / "fhir-validate"


def contract(kind: str, enrollment_id: str | None = None) -> dict[str, Any]:
    text = (CONTRACT / f"{kind}.json").read_text(encoding="utf-8")
    payload: dict[str, Any] = json.loads(text.replace("{{enrollment_id}}", enrollment_id or ""))
    return payload


@pytest.fixture
def enrolled(client: Any) -> str:
    assert client.post("/iop/partners", json=contract("partner")).status_code == 201
    enrollment_id: str = client.post("/iop/enrollments", json=contract("enrollment")).get_json()["id"]
    assert client.post("/iop/treatment-plans", json=contract("treatment-plan", enrollment_id)).status_code == 201
    return enrollment_id


def deliveries(app: Any, **filters: Any) -> list[Any]:
    rows, _ = app.extensions["iop_fhir.store"].deliveries(**filters)
    return list(rows)


def test_discharge_with_referral_and_consent_queues_one_transition_bundle(app: Any, client: Any, enrolled: str) -> None:
    consent = contract("consent", enrolled)
    del consent["expires_on"]  # in force whenever the test runs (consents are decided on the day)
    assert client.post("/iop/consents", json=consent).status_code == 201
    discharge = client.post("/iop/discharges", json=contract("discharge", enrolled)).get_json()
    rows = deliveries(app, record_kind="discharge", record_id=discharge["id"])
    assert len(rows) == 1
    row = rows[0]
    assert (row.partner_id, row.kind, row.status) == ("passaic-valley-recovery", "bundle", "pending")
    bundle = row.payload["body"]
    types = [e["resource"]["resourceType"] for e in bundle["entry"]]
    # the partner's Organization (the Task's owner) goes too, so the receiver resolves it
    assert types == ["Patient", "Organization", "CarePlan", "ServiceRequest", "Task", "Consent", "Bundle"]
    assert all(e["request"]["url"].startswith(f"{t}?identifier=") for e, t in zip(bundle["entry"], types, strict=True))
    assert bundle["entry"][6]["resource"]["type"] == "document"
    assert "RedisclosureProhibitionMark" in [s["code"] for s in bundle["meta"]["security"]]
    task = bundle["entry"][4]["resource"]
    assert task["focus"]["reference"] == bundle["entry"][3]["fullUrl"]
    assert task["for"]["reference"] == bundle["entry"][0]["fullUrl"]
    assert task["owner"]["reference"] == bundle["entry"][1]["fullUrl"]
    assert bundle["entry"][1]["fullUrl"].startswith("urn:uuid:")
    assert bundle["entry"][1]["resource"]["name"] == "Passaic Valley Recovery Services"


def test_transition_without_consent_waits_blocked(app: Any, client: Any, enrolled: str) -> None:
    discharge = client.post("/iop/discharges", json=contract("discharge", enrolled)).get_json()
    rows = deliveries(app, record_kind="discharge", record_id=discharge["id"])
    assert [r.status for r in rows] == ["blocked"]
    assert "no consent" in (rows[0].last_error or {}).get("message", "")
    assert all(e["resource"]["resourceType"] != "Consent" for e in rows[0].payload["body"]["entry"])


def test_consent_for_counseling_notes_only_does_not_permit_a_transition(app: Any, client: Any, enrolled: str) -> None:
    consent = contract("consent", enrolled)
    consent["scope"] = "sud-counseling-notes"
    assert client.post("/iop/consents", json=consent).status_code == 201
    discharge = client.post("/iop/discharges", json=contract("discharge", enrolled)).get_json()
    assert [r.status for r in deliveries(app, record_id=discharge["id"])] == ["blocked"]


def test_discharge_without_referral_queues_nothing(app: Any, client: Any, enrolled: str) -> None:
    payload = contract("discharge", enrolled)
    del payload["referral"]
    discharge = client.post("/iop/discharges", json=payload).get_json()
    assert deliveries(app, record_id=discharge["id"]) == []


def test_a_refused_discharge_queues_nothing(app: Any, client: Any, enrolled: str) -> None:
    payload = contract("discharge", enrolled)
    payload["goal_outcomes"][0]["goal"] = "no-such-goal"
    assert client.post("/iop/discharges", json=payload).status_code == 422
    assert deliveries(app) == []


def test_retracting_the_discharge_tells_the_partner(app: Any, client: Any, enrolled: str) -> None:
    assert client.post("/iop/consents", json=contract("consent", enrolled)).status_code == 201
    discharge = client.post("/iop/discharges", json=contract("discharge", enrolled)).get_json()
    client.post(f"/iop/discharges/{discharge['id']}/retract")
    rows = deliveries(app, record_id=discharge["id"])
    assert len(rows) == 2
    task = next(e["resource"] for e in rows[1].payload["body"]["entry"] if e["resource"]["resourceType"] == "Task")
    assert task["status"] == "entered-in-error"


@pytest.mark.peers
def test_transition_bundle_is_valid_fhir(app: Any, client: Any, enrolled: str, tmp_path: Path) -> None:
    assert client.post("/iop/consents", json=contract("consent", enrolled)).status_code == 201
    discharge = client.post("/iop/discharges", json=contract("discharge", enrolled)).get_json()
    bundle = deliveries(app, record_id=discharge["id"])[0].payload["body"]
    path = tmp_path / "transition.json"
    path.write_text(json.dumps(bundle), encoding="utf-8")
    result = subprocess.run([str(VALIDATOR), str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert package.REDISCLOSURE_NOTICE in path.read_text(encoding="utf-8")
