"""Sessions, assessments and medications happen within their enrollment, from admission to discharge: a record dated
outside it is refused with a 422 naming the dates and the field, and nothing is written; retracting the discharge
reopens the enrollment."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

CONTRACT = Path(__file__).resolve().parents[2].parent / "shared" / "contract"


def contract(name: str, **fill: str) -> dict[str, Any]:
    text = (CONTRACT / f"{name}.json").read_text(encoding="utf-8")
    for key, value in fill.items():
        text = text.replace("{{" + key + "}}", value)
    payload: dict[str, Any] = json.loads(text)
    return payload


@pytest.fixture
def enrollment_id(client: Any) -> str:
    """An enrollment admitted on 2026-01-05 (the enrollment contract)."""
    response = client.post("/iop/enrollments", json=contract("enrollment"))
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["admission_date"] == "2026-01-05"
    found: str = response.get_json()["id"]
    return found


def _discharge(client: Any, enrollment_id: str, day: str) -> str:
    payload = {"enrollment_id": enrollment_id, "discharge_date": day, "reason": "against-advice"}
    response = client.post("/iop/discharges", json=payload)
    assert response.status_code == 201, response.get_json()
    found: str = response.get_json()["id"]
    return found


def _refused(response: Any, expression: str, *words: str) -> None:
    assert response.status_code == 422, response.get_json()
    [issue] = response.get_json()["issue"]
    assert issue["code"] == "business-rule"
    assert issue["expression"] == [expression]
    for word in words:
        assert word in issue["diagnostics"]


def _session(enrollment_id: str, start: str) -> dict[str, Any]:
    payload = contract("session", enrollment_id=enrollment_id)
    payload["start"], payload["end"] = f"{start}T18:00:00-05:00", f"{start}T21:00:00-05:00"
    payload["drug_screen"]["collected_at"] = f"{start}T18:05:00-05:00"
    return payload


def test_a_session_before_admission_is_refused_naming_both_dates(client: Any, enrollment_id: str) -> None:
    response = client.post("/iop/sessions", json=_session(enrollment_id, "2026-01-04"))
    _refused(response, "start", "2026-01-04", "admission on 2026-01-05")
    assert client.get(f"/iop/sessions?enrollment={enrollment_id}").get_json()["total"] == 0


def test_a_session_on_the_admission_and_discharge_days_is_within_the_enrollment(
    client: Any, enrollment_id: str
) -> None:
    assert client.post("/iop/sessions", json=_session(enrollment_id, "2026-01-05")).status_code == 201
    _discharge(client, enrollment_id, "2026-02-20")
    assert client.post("/iop/sessions", json=_session(enrollment_id, "2026-02-20")).status_code == 201


def test_a_session_after_discharge_is_refused_until_the_discharge_is_retracted(client: Any, enrollment_id: str) -> None:
    discharge_id = _discharge(client, enrollment_id, "2026-02-20")
    late = _session(enrollment_id, "2026-02-23")
    _refused(client.post("/iop/sessions", json=late), "start", "2026-02-23", "discharge on 2026-02-20", "retract")
    assert client.get(f"/iop/sessions?enrollment={enrollment_id}").get_json()["total"] == 0

    assert client.post(f"/iop/discharges/{discharge_id}/retract", json={"reason": "entered early"}).status_code == 200
    assert client.post("/iop/sessions", json=late).status_code == 201


def test_a_put_that_moves_a_session_outside_the_enrollment_is_refused_and_changes_nothing(
    client: Any, enrollment_id: str
) -> None:
    created = client.post("/iop/sessions", json=_session(enrollment_id, "2026-01-07")).get_json()
    moved = copy.deepcopy(_session(enrollment_id, "2026-01-07"))
    moved["start"] = "2025-12-31T18:00:00-05:00"
    _refused(client.put(f"/iop/sessions/{created['id']}", json=moved), "start", "2025-12-31")
    assert client.get(f"/iop/sessions/{created['id']}").get_json()["meta"]["version"] == 1


def test_an_assessment_before_admission_is_refused(client: Any, enrollment_id: str) -> None:
    payload = contract("assessment-reassessment", enrollment_id=enrollment_id)
    payload["performed_at"] = "2026-01-02T10:30:00-05:00"
    _refused(client.post("/iop/assessments", json=payload), "performed_at", "2026-01-02", "2026-01-05")


def test_a_medication_that_started_before_admission_and_continues_is_within_the_enrollment(
    client: Any, enrollment_id: str
) -> None:
    payload = contract("medication", enrollment_id=enrollment_id)
    payload["start"] = "2025-11-20"  # inducted inpatient, continued in the program
    assert client.post("/iop/medications", json=payload).status_code == 201


def test_a_medication_that_ended_before_admission_or_starts_after_discharge_is_refused(
    client: Any, enrollment_id: str
) -> None:
    ended = contract("medication", enrollment_id=enrollment_id)
    ended.update(start="2025-10-01", end="2025-12-01", status="stopped")
    _refused(client.post("/iop/medications", json=ended), "end", "2025-12-01", "admission on 2026-01-05")
    _discharge(client, enrollment_id, "2026-02-20")
    later = contract("medication", enrollment_id=enrollment_id)
    later["start"] = "2026-03-01"
    _refused(client.post("/iop/medications", json=later), "start", "2026-03-01", "discharge on 2026-02-20")


def test_each_group_attendee_is_checked_against_their_own_enrollment(client: Any, enrollment_id: str) -> None:
    other = contract("enrollment")
    other["patient"]["identifiers"][0]["value"] = "MRN-PERIOD-2"
    other["admission_date"] = "2026-01-20"
    second = client.post("/iop/enrollments", json=other).get_json()["id"]
    third = contract("enrollment")
    third["patient"]["identifiers"][0]["value"] = "MRN-PERIOD-3"
    third_id = client.post("/iop/enrollments", json=third).get_json()["id"]
    payload = contract("group-session", enrollment_id=enrollment_id, enrollment_id_2=second, enrollment_id_3=third_id)
    response = client.post("/iop/group-sessions", json=payload)  # 2026-01-12: before the second's admission
    # the group's start, for its second attendee
    _refused(response, "start", "for attendees[1]", "2026-01-12", "admission on 2026-01-20")
    assert client.get("/iop/group-sessions").get_json()["total"] == 0
