"""A discharge to a higher level of care (a step-up to ASAM 3.7 withdrawal management or 3.5 residential) refers the
patient to that level: the ServiceRequest is coded for it (SNOMED 1254709001 with the ASAM level, the service in
orderDetail), and its supportingInfo names what the receiving unit needs (current substance use, the last drug
screens, the medications), which travel with it to the unit."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

CONTRACT = Path(__file__).resolve().parents[3] / "shared" / "contract"
VALIDATOR = Path(__file__).resolve().parents[3] / "shared" / "tools" / "fhir-validate"
SNOMED = "http://snomed.info/sct"
ASAM = "https://iop-fhir.org/fhir/CodeSystem/asam-level-of-care"


def contract(kind: str, enrollment_id: str = "") -> dict[str, Any]:
    text = (CONTRACT / f"{kind}.json").read_text(encoding="utf-8")
    payload: dict[str, Any] = json.loads(text.replace("{{enrollment_id}}", enrollment_id))
    return payload


def created(client: Any, path: str, payload: dict[str, Any]) -> dict[str, Any]:
    response = client.post(path, json=payload)
    assert response.status_code == 201, response.get_json()
    body: dict[str, Any] = response.get_json()
    return body


def own(body: dict[str, Any], prefix: str) -> list[str]:
    return [ref for ref in body["fhir"] if ref.startswith(prefix)]


@pytest.fixture
def treated(client: Any) -> dict[str, Any]:
    """An enrollment with an intake and a reassessment, two screened sessions (one older than 30 days before the
    discharge) and a medication; the program's Organization and the receiving unit recorded."""
    assert client.put("/iop/organization", json=contract("organization")).status_code in (200, 201)
    unit = contract("partner")
    unit.update(id="test-withdrawal-unit", kind="inpatient-unit", name="Test Withdrawal Management Unit")
    created(client, "/iop/partners", unit)
    enrollment_id = created(client, "/iop/enrollments", contract("enrollment"))["id"]
    created(client, "/iop/treatment-plans", contract("treatment-plan", enrollment_id))
    intake = created(client, "/iop/assessments", contract("assessment", enrollment_id))
    reassessment = contract("assessment-reassessment", enrollment_id)
    reassessment["substance_use"] = [{"substance": "opioids", "frequency": "daily", "last_use": "2026-02-01"}]
    latest = created(client, "/iop/assessments", reassessment)
    old_screen = created(client, "/iop/sessions", contract("session", enrollment_id))
    recent = contract("session", enrollment_id)
    recent.update(start="2026-02-20T18:00:00-05:00", end="2026-02-20T21:00:00-05:00")
    recent["drug_screen"] = copy.deepcopy(recent["drug_screen"]) | {"collected_at": "2026-02-20T18:05:00-05:00"}
    recent_screen = created(client, "/iop/sessions", recent)
    medication = created(client, "/iop/medications", contract("medication", enrollment_id))
    return {
        "enrollment_id": enrollment_id,
        "intake": intake,
        "latest": latest,
        "old_screen": old_screen,
        "recent_screen": recent_screen,
        "medication": medication,
    }


def step_up(enrollment_id: str, level: str) -> dict[str, Any]:
    discharge = contract("discharge", enrollment_id)
    discharge.update(discharge_date="2026-03-06", reason="stepped-up")
    discharge["continuing_care"] = {"level_of_care": level}
    discharge["referral"] = {
        "partner": "test-withdrawal-unit",
        "service": "intake-assessment",
        "reason": "Relapse to daily opioid use with withdrawal; needs medically monitored withdrawal management",
        "priority": "urgent",
    }
    return discharge


def service_request(client: Any, discharge: dict[str, Any]) -> dict[str, Any]:
    [ref] = own(discharge, "ServiceRequest/")
    found: dict[str, Any] = client.get(f"/fhir/{ref}").get_json()
    return found


@pytest.mark.parametrize(
    ("level", "display"),
    [
        ("3.7", "Medically Monitored Intensive Inpatient Services"),
        ("3.5", "Clinically Managed High-Intensity Residential Services"),
    ],
)
def test_a_step_up_codes_the_service_request_for_the_level_and_names_what_the_unit_needs(
    client: Any, treated: dict[str, Any], level: str, display: str
) -> None:
    discharge = created(client, "/iop/discharges", step_up(treated["enrollment_id"], level))
    request = service_request(client, discharge)
    assert request["code"]["coding"][0] == {
        "system": SNOMED,
        "code": "1254709001",
        "display": "Referral to substance use disorder treatment program (procedure)",
    }
    assert request["code"]["coding"][1] == {"system": ASAM, "code": level, "display": display}
    # the service referred to is kept, in orderDetail
    assert [c["code"] for c in request["orderDetail"][0]["coding"]] == ["90791", "H0001"]
    assert request["requester"]["reference"] == "Organization/clifton-recovery-center"
    assert request["performer"] == [{"reference": "Organization/test-withdrawal-unit"}]

    supporting = [s["reference"] for s in request["supportingInfo"]]
    assert supporting[0] == own(discharge, "CarePlan/")[0]
    latest_use = [
        ref
        for ref in own(treated["latest"], "Observation/")
        if client.get(f"/fhir/{ref}").get_json()["code"].get("coding")
    ]
    substance = [
        ref
        for ref in supporting
        if ref in own(treated["latest"], "Observation/") or ref in own(treated["intake"], "Observation/")
    ]
    assert substance and set(substance) <= set(latest_use), "only the latest assessment's substance use"
    assert not set(supporting) & set(own(treated["intake"], "Observation/"))
    recent = [ref for ref in supporting if ref in own(treated["recent_screen"], "Observation/")]
    assert recent, "the drug screens of the last 30 days"
    assert not set(supporting) & set(own(treated["old_screen"], "Observation/")), "older screens are left out"
    assert any(ref in treated["medication"]["fhir"] for ref in supporting)
    # every reference names a resource that exists, and says what it is
    for item in request["supportingInfo"][1:]:
        assert client.get(f"/fhir/{item['reference']}").status_code == 200, item
        assert item["display"]
    displays = [s.get("display", "") for s in request["supportingInfo"]]
    assert "Drug screen of 2026-02-20" in displays
    assert "Medication: buprenorphine-naloxone" in displays
    assert "Substance use (assessment of 2026-02-02)" in displays


def test_the_substance_use_named_is_the_latest_assessments_opioid_use(client: Any, treated: dict[str, Any]) -> None:
    discharge = created(client, "/iop/discharges", step_up(treated["enrollment_id"], "3.7"))
    request = service_request(client, discharge)
    uses = [
        client.get(f"/fhir/{s['reference']}").get_json()
        for s in request["supportingInfo"]
        if s.get("display", "").startswith("Substance use")
    ]
    assert len(uses) == 1
    assert "opioid" in json.dumps(uses[0]).lower()


def test_an_outpatient_aftercare_referral_keeps_its_service_code_and_names_only_the_plan(
    client: Any, treated: dict[str, Any]
) -> None:
    discharge = contract("discharge", treated["enrollment_id"])
    discharge["referral"]["partner"] = "test-withdrawal-unit"
    body = created(client, "/iop/discharges", discharge)
    request = service_request(client, body)
    assert "1254709001" not in json.dumps(request["code"])
    assert "orderDetail" not in request
    assert request["supportingInfo"] == [{"reference": own(body, "CarePlan/")[0]}]


def test_the_step_up_service_request_is_valid_fhir(client: Any, treated: dict[str, Any], tmp_path: Path) -> None:
    if not VALIDATOR.exists():
        pytest.skip("no validator")
    discharge = created(client, "/iop/discharges", step_up(treated["enrollment_id"], "3.7"))
    path = tmp_path / "sr.json"
    path.write_text(json.dumps(service_request(client, discharge)), encoding="utf-8")
    result = subprocess.run([str(VALIDATOR), str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
