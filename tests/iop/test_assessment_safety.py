"""Safety signals and AUDIT-C in assessments, through the /iop API on both databases: PHQ-9 item 9 above 0 raises a
Flag, a review Task for the care team and a warning; a correction withdraws them; AUDIT-C takes its items and is
interpreted with the cut-off of the patient's gender."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from iop_fhir.r4.profiles import ProfileRegistry

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(__file__).resolve().parents[2].parent / "shared"
CONTRACT = SHARED / "contract"
VALIDATOR = SHARED / "tools" / "fhir-validate"
LOCAL = "https://iop-fhir.org/fhir/CodeSystem/iop-concepts"
FLAG_DETAIL = "http://hl7.org/fhir/StructureDefinition/flag-detail"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
PART2 = {
    ("http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "R"),
    (ACT_CODE, "42CFRPart2"),
    (ACT_CODE, "SUD"),
    (ACT_CODE, "NORDSCLCD"),
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


def produced(client: Any, body: dict[str, Any], res_type: str) -> list[dict[str, Any]]:
    return [read(client, ref) for ref in body["fhir"] if ref.startswith(f"{res_type}/")]


def enroll(client: Any, gender: str = "female", mrn: str | None = None) -> dict[str, Any]:
    """An enrollment of the contract patient, or of another person (another MRN) of the given gender."""
    payload = contract("enrollment")
    payload["patient"]["gender"] = gender
    if mrn is not None:
        payload["patient"]["identifiers"] = [{"system": "urn:oid:2.16.840.1.113883.19.5.99999.1", "value": mrn}]
    response = client.post("/iop/enrollments", json=payload)
    assert response.status_code == 201, response.get_json()
    body: dict[str, Any] = response.get_json()
    body["patient"] = next(ref for ref in body["fhir"] if ref.startswith("Patient/"))
    return body


def post_assessment(client: Any, payload: dict[str, Any], status: int = 201) -> dict[str, Any]:
    response = client.post("/iop/assessments", json=payload)
    assert response.status_code == status, response.get_json()
    body: dict[str, Any] = response.get_json()
    return body


@pytest.fixture
def enrollment(client: Any) -> dict[str, Any]:
    return enroll(client)


def _labels(resource: dict[str, Any]) -> set[tuple[str, str]]:
    return {(s["system"], s["code"]) for s in resource["meta"]["security"]}


# -- PHQ-9 item 9 ------------------------------------------------------------------------------------------------


def test_phq9_item_9_above_0_is_a_warning_naming_the_item(client: Any, enrollment: dict[str, Any]) -> None:
    body = post_assessment(client, contract("assessment-reassessment", enrollment["id"]))
    (warning,) = body["warnings"]
    assert (warning["severity"], warning["code"]) == ("warning", "business-rule")
    assert warning["expression"] == ["instruments[0].items[8]"]
    assert warning["diagnostics"].startswith("PHQ-9 item 9 is 1: a suicide-risk Flag is raised")


def test_phq9_item_9_above_0_raises_an_active_safety_flag_on_the_patient(
    client: Any, enrollment: dict[str, Any]
) -> None:
    payload = contract("assessment-reassessment", enrollment["id"])
    body = post_assessment(client, payload)
    (flag,) = produced(client, body, "Flag")
    assert flag["status"] == "active"
    assert flag["subject"] == {"reference": enrollment["patient"]}
    assert flag["period"] == {"start": payload["performed_at"]}
    assert flag["category"][0]["coding"][0]["code"] == "safety"
    assert flag["code"]["coding"] == [
        {"system": LOCAL, "code": "suicide-risk-screen-positive", "display": "Positive suicide-risk screen"}
    ]
    assert _labels(flag) >= PART2
    # the Flag points at the item Observation that raised it: PHQ-9 item 9 (LOINC 44260-8), answered 1
    (detail,) = [e for e in flag["extension"] if e["url"] == FLAG_DETAIL]
    item = read(client, detail["valueReference"]["reference"])
    assert item["code"]["coding"][0]["code"] == "44260-8"
    assert item["valueInteger"] == 1
    # and is found among the patient's flags (R4 defines no status search parameter for Flag)
    found = client.get(f"/fhir/Flag?patient={enrollment['patient']}").get_json()
    assert [e["resource"]["id"] for e in found["entry"]] == [flag["id"]]


def test_phq9_item_9_above_0_asks_for_an_urgent_review_by_a_task(client: Any, enrollment: dict[str, Any]) -> None:
    payload = contract("assessment-reassessment", enrollment["id"])
    body = post_assessment(client, payload)
    (flag,) = produced(client, body, "Flag")
    (task,) = produced(client, body, "Task")
    assert (task["status"], task["intent"], task["priority"]) == ("requested", "order", "asap")
    assert task["code"]["coding"][0] == {
        "system": LOCAL,
        "code": "review-suicide-risk-screen",
        "display": "Review suicide-risk screen",
    }
    assert task["description"].startswith("Review suicide-risk screen")
    assert task["focus"] == {"reference": f"Flag/{flag['id']}"}
    assert task["for"] == {"reference": enrollment["patient"]}
    assert task["authoredOn"] == payload["performed_at"]
    assert read(client, task["requester"]["reference"])["resourceType"] == "Practitioner"
    assert task["reasonReference"] == next(e["valueReference"] for e in flag["extension"] if e["url"] == FLAG_DETAIL)
    assert "owner" not in task  # the enrollment has no treatment plan, so no care team yet
    assert _labels(task) >= PART2


def test_safety_task_is_owned_by_the_care_team_of_the_current_treatment_plan(
    client: Any, enrollment: dict[str, Any]
) -> None:
    plan = client.post("/iop/treatment-plans", json=contract("treatment-plan", enrollment["id"])).get_json()
    (care_team_ref,) = [ref for ref in plan["fhir"] if ref.startswith("CareTeam/")]
    body = post_assessment(client, contract("assessment-reassessment", enrollment["id"]))
    (task,) = produced(client, body, "Task")
    assert task["owner"] == {"reference": care_team_ref}
    assert read(client, care_team_ref)["subject"] == {"reference": enrollment["patient"]}


@pytest.mark.parametrize(
    "phq9",
    [
        {"instrument": "phq-9", "items": [2, 2, 1, 2, 1, 2, 1, 1, 0]},  # item 9 answered 0
        {"instrument": "phq-9", "total_score": 27},  # no items: nothing says what item 9 was
    ],
    ids=["item-9-is-0", "total-only"],
)
def test_no_flag_task_or_warning_without_a_positive_item_9(
    client: Any, enrollment: dict[str, Any], phq9: dict[str, Any]
) -> None:
    payload = contract("assessment-reassessment", enrollment["id"])
    payload["instruments"][0] = phq9
    body = post_assessment(client, payload)
    assert "warnings" not in body
    assert not [ref for ref in body["fhir"] if ref.startswith(("Flag/", "Task/"))]
    assert client.get("/fhir/Flag?_summary=count").get_json()["total"] == 0
    assert client.get("/fhir/Task?_summary=count").get_json()["total"] == 0


def test_replaying_the_assessment_changes_neither_flag_nor_task(client: Any, enrollment: dict[str, Any]) -> None:
    payload = contract("assessment-reassessment", enrollment["id"])
    first = post_assessment(client, payload)
    again = post_assessment(client, payload, status=200)
    assert again["fhir"] == first["fhir"]
    assert again["warnings"] == first["warnings"]
    for res_type in ("Flag", "Task"):
        (resource,) = produced(client, again, res_type)
        assert resource["meta"]["versionId"] == "1"
        assert client.get(f"/fhir/{res_type}?_summary=count").get_json()["total"] == 1


def test_correction_that_answers_item_9_with_0_withdraws_the_flag_and_cancels_the_task(
    client: Any, enrollment: dict[str, Any]
) -> None:
    payload = contract("assessment-reassessment", enrollment["id"])
    first = post_assessment(client, payload)
    flag_ref = next(ref for ref in first["fhir"] if ref.startswith("Flag/"))
    task_ref = next(ref for ref in first["fhir"] if ref.startswith("Task/"))
    corrected = copy.deepcopy(payload)
    corrected["instruments"][0] = {"instrument": "phq-9", "items": [1, 1, 1, 1, 0, 1, 1, 0, 0], "total_score": 6}
    response = client.put(f"/iop/assessments/{first['id']}", json=corrected)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert "warnings" not in body
    flag, task = read(client, flag_ref), read(client, task_ref)
    assert (flag["status"], flag["meta"]["versionId"]) == ("entered-in-error", "2")
    assert (task["status"], task["meta"]["versionId"]) == ("cancelled", "2")
    assert task["statusReason"]["text"]
    flags = client.get(f"/fhir/Flag?patient={enrollment['patient']}").get_json()
    assert [e["resource"]["status"] for e in flags["entry"]] == ["entered-in-error"]
    # answering it again above 0 raises the same Flag and Task again
    again = client.put(f"/iop/assessments/{first['id']}", json=payload).get_json()
    assert again["warnings"][0]["expression"] == ["instruments[0].items[8]"]
    assert (read(client, flag_ref)["status"], read(client, task_ref)["status"]) == ("active", "requested")


def test_retracting_the_assessment_withdraws_the_flag_and_cancels_the_task(
    client: Any, enrollment: dict[str, Any]
) -> None:
    first = post_assessment(client, contract("assessment-reassessment", enrollment["id"]))
    response = client.post(f"/iop/assessments/{first['id']}/retract", json={"reason": "wrong patient"})
    assert response.status_code == 200, response.get_json()
    (flag,) = produced(client, first, "Flag")
    (task,) = produced(client, first, "Task")
    assert (flag["status"], task["status"]) == ("entered-in-error", "cancelled")


@pytest.mark.peers
def test_flag_and_task_pass_the_independent_validator(client: Any, enrollment: dict[str, Any], tmp_path: Path) -> None:
    client.post("/iop/treatment-plans", json=contract("treatment-plan", enrollment["id"]))
    body = post_assessment(client, contract("assessment-reassessment", enrollment["id"]))
    for resource in produced(client, body, "Flag") + produced(client, body, "Task"):
        (tmp_path / f"{resource['resourceType']}-{resource['id']}.json").write_text(json.dumps(resource))
    result = subprocess.run([str(VALIDATOR), "--quiet", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 resources: 2 OK" in result.stdout + result.stderr


def test_a_partner_sees_the_flag_and_task_only_of_a_patient_who_consented(client: Any, program: dict[str, Any]) -> None:
    made = {}
    for name in ("a", "b"):
        body = post_assessment(client, contract("assessment-reassessment", program[name]["enrollment"]))
        made[name] = {ref.split("/", 1)[0]: ref for ref in body["fhir"] if ref.startswith(("Flag/", "Task/"))}
    partner = program["partner"]
    for res_type in ("Flag", "Task"):
        found = partner.get(f"/fhir/{res_type}").get_json()
        assert [f"{res_type}/{e['resource']['id']}" for e in found.get("entry", [])] == [made["a"][res_type]]
        assert partner.get(f"/fhir/{made['b'][res_type]}").status_code == 404


def test_safety_flag_profile_requires_the_observation_that_raised_it_and_the_safety_category() -> None:
    registry = ProfileRegistry.load(REPO / "profiles", REPO / "mappings" / "terminology")
    flag = {
        "resourceType": "Flag",
        "status": "active",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/flag-category", "code": "clinical"}]}
        ],
        "code": {"coding": [{"system": LOCAL, "code": "suicide-risk-screen-positive"}]},
        "subject": {"reference": "Patient/p1"},
        "period": {"start": "2026-02-02T10:30:00-05:00"},
    }
    issues = registry.check(flag, "https://iop-fhir.org/fhir/StructureDefinition/iop-safety-flag")
    assert sorted((i.code, i.expression) for i in issues if i.severity == "error") == [
        ("invariant", "Flag"),
        ("required", "Flag.category"),
    ]
    assert any("iop-safety-flag-1" in i.diagnostics for i in issues)


# -- AUDIT-C -----------------------------------------------------------------------------------------------------


def _audit_c(client: Any, enrollment_id: str, instrument: dict[str, Any]) -> dict[str, Any]:
    payload = contract("assessment-reassessment", enrollment_id)
    payload["instruments"] = [instrument]
    body = post_assessment(client, payload)
    return next(o for o in produced(client, body, "Observation") if o["code"]["coding"][0]["code"] == "75626-2")


@pytest.mark.parametrize(
    ("gender", "expected", "basis"),
    [
        ("female", "severity-positive-screen", "the AUDIT-C cut-off for women"),
        ("male", "severity-negative-screen", "the AUDIT-C cut-off for men"),
        ("other", "severity-positive-screen", "the lower AUDIT-C cut-off (for women)"),
        ("unknown", "severity-positive-screen", "the lower AUDIT-C cut-off (for women)"),
    ],
)
def test_audit_c_total_of_3_is_interpreted_with_the_cut_off_of_the_patients_gender(
    client: Any, gender: str, expected: str, basis: str
) -> None:
    enrollment = enroll(client, gender, mrn=f"MRN-{gender}")
    total = _audit_c(client, enrollment["id"], {"instrument": "audit-c", "items": [1, 1, 1], "total_score": 3})
    assert total["valueQuantity"]["value"] == 3
    (interpretation,) = total["interpretation"]
    assert interpretation["coding"][0]["code"] == expected
    assert basis in interpretation["text"]


def test_audit_c_items_are_item_observations_of_its_panel(client: Any, enrollment: dict[str, Any]) -> None:
    payload = contract("assessment-reassessment", enrollment["id"])
    body = post_assessment(client, payload)
    observations = produced(client, body, "Observation")
    panel = next(o for o in observations if o["code"]["coding"][0]["code"] == "72109-2")
    members = [read(client, m["reference"]) for m in panel["hasMember"]]
    assert [(m["code"]["coding"][0]["code"], m.get("valueInteger")) for m in members[:3]] == [
        ("audit-c-item-1", 1),  # item 1's LOINC code is disputed (TERMINOLOGY.md §3.3): a project code
        ("68519-8", 1),
        ("68520-6", 0),
    ]
    assert members[3]["code"]["coding"][0]["code"] == "75626-2"
    # the contract patient is female: 2 is below her cut-off of 3
    assert members[3]["interpretation"][0]["coding"][0]["code"] == "severity-negative-screen"


def test_audit_c_items_that_do_not_add_up_are_refused_naming_the_total(client: Any, enrollment: dict[str, Any]) -> None:
    payload = contract("assessment-reassessment", enrollment["id"])
    payload["instruments"][2] = {"instrument": "audit-c", "items": [1, 1, 0], "total_score": 3}
    response = client.post("/iop/assessments", json=payload)
    # as for every instrument (README: items that do not add up to the total are a 400)
    assert response.status_code == 400
    (issue,) = response.get_json()["issue"]
    assert (issue["code"], issue["expression"]) == ("invariant", ["instruments[2].total_score"])
    assert "add up to 2, but total_score is 3" in issue["diagnostics"]
    assert client.get("/iop/assessments").get_json()["total"] == 0
