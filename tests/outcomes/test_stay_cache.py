"""The stays an outcome reader keeps built (outcomes/load.py StayCache): a request after no change builds no stay,
and after each kind of write the stays it touched are built again, the others taken as kept, and every answer is
the one a reader with nothing kept computes. Another process's writes are seen on the next request."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from iop_fhir.app import create_app
from iop_fhir.config import Settings
from iop_fhir.outcomes import stays
from iop_fhir.outcomes.load import Reader, StayCache
from tests.exchange.test_followup import answer
from tests.iop.test_outcomes_api import session
from tests.iop.test_records_api import contract, post

OUTCOMES = "/iop/outcomes?from=2026-01-01&to=2026-03-31"


def enroll(client: FlaskClient, mrn: str) -> str:
    payload = contract("enrollment")
    payload["patient"]["identifiers"][0]["value"] = mrn
    response = post(client, "enrollment", payload)
    assert response.status_code == 201, response.get_json()
    enrollment_id: str = response.get_json()["id"]
    assert post(client, "treatment-plan", contract("treatment-plan", enrollment_id)).status_code == 201
    return enrollment_id


def group(attending: list[str]) -> dict[str, Any]:
    """The contract's group session, attended by the enrollments given (without drug screens)."""
    payload = contract("group-session")
    attendees = payload["attendees"]
    payload["attendees"] = [
        {**{k: v for k, v in attendees[n % 2].items() if k != "drug_screen"}, "enrollment_id": eid}
        for n, eid in enumerate(attending)
    ]
    return payload


@pytest.fixture
def program(app: Flask, client: FlaskClient) -> dict[str, Any]:
    """Four stays admitted 2026-01-05: E1..E3 with sessions, E1 with an assessment, E1 and E2 at a group session,
    E3 discharged with a referral to the partner; E4 with a plan only."""
    assert post(client, "partner", contract("partner")).status_code == 201
    found: dict[str, Any] = {f"E{n}": enroll(client, f"MRN-C-{n}") for n in range(1, 5)}
    for name in ("E1", "E2", "E3"):
        for day, attendance in (("2026-01-05", "attended"), ("2026-01-07", "no-show")):
            response = post(client, "session", session(found[name], day, attendance))
            assert response.status_code == 201, response.get_json()
    response = post(client, "assessment", contract("assessment", found["E1"]))
    assert response.status_code == 201, response.get_json()
    found["assessment"] = response.get_json()
    response = client.post("/iop/group-sessions", json=group([found["E1"], found["E2"]]))
    assert response.status_code == 201, response.get_json()
    found["group"] = response.get_json()
    consent = contract("consent", found["E3"])
    del consent["expires_on"]
    assert post(client, "consent", consent).status_code == 201
    discharge = contract("discharge", found["E3"])
    discharge["discharge_date"] = "2026-01-16"
    response = post(client, "discharge", discharge)
    assert response.status_code == 201, response.get_json()
    found["discharge"] = response.get_json()
    return found


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The enrollment ids of the stays built from their records, in order."""
    seen: list[str] = []
    build = stays.build

    def counted(**kwargs: Any) -> Any:
        seen.append(kwargs["enrollment_id"])
        return build(**kwargs)

    monkeypatch.setattr(stays, "build", counted)
    return seen


def answered(client: FlaskClient, path: str) -> dict[str, Any]:
    response = client.get(path)
    assert response.status_code == 200, response.get_json()
    body: dict[str, Any] = response.get_json()
    return body


def fresh(app: Flask, client: FlaskClient, path: str) -> dict[str, Any]:
    """The answer of a reader that keeps nothing built."""
    kept: Reader = app.extensions["iop_fhir.outcomes"]
    app.extensions["iop_fhir.outcomes"] = replace(kept, cache=StayCache())
    try:
        return answered(client, path)
    finally:
        app.extensions["iop_fhir.outcomes"] = kept


def each_stay(program: dict[str, Any]) -> list[str]:
    return [f"/iop/enrollments/{program[f'E{n}']}/outcomes" for n in range(1, 5)]


def test_a_second_request_with_nothing_changed_builds_no_stay(
    app: Flask, client: FlaskClient, program: dict[str, Any], built: list[str]
) -> None:
    first = answered(client, OUTCOMES)
    assert first["stays"] == 4
    built.clear()
    assert answered(client, OUTCOMES) == first
    assert [answered(client, path) for path in each_stay(program)] == [
        fresh(app, client, p) for p in each_stay(program)
    ]
    built.clear()
    answered(client, OUTCOMES)
    for path in each_stay(program):
        answered(client, path)
    assert built == []


def new_session(app: Flask, client: FlaskClient, program: dict[str, Any]) -> set[str]:
    assert post(client, "session", session(program["E2"], "2026-01-09", "attended")).status_code == 201
    return {program["E2"]}


def retracted_session(app: Flask, client: FlaskClient, program: dict[str, Any]) -> set[str]:
    found = client.get(f"/iop/sessions?enrollment={program['E1']}").get_json()["items"]
    missed = next(s for s in found if s["attendance"] == "no-show")
    assert client.post(f"/iop/sessions/{missed['id']}/retract", json={"reason": "wrong patient"}).status_code == 200
    return {program["E1"]}


def edited_assessment(app: Flask, client: FlaskClient, program: dict[str, Any]) -> set[str]:
    payload = contract("assessment", program["E1"])
    phq9 = next(i for i in payload["instruments"] if i["instrument"] == "phq-9")
    phq9["items"] = [0, 0, 0, 1, 0, 0, 1, 0, 0]
    phq9["total_score"] = 2
    response = client.put(f"/iop/assessments/{program['assessment']['id']}", json=payload)
    assert response.status_code == 200, response.get_json()
    return {program["E1"]}


def new_discharge(app: Flask, client: FlaskClient, program: dict[str, Any]) -> set[str]:
    discharge = contract("discharge", program["E1"])
    discharge["discharge_date"] = "2026-01-20"
    discharge["reason"] = "against-advice"
    del discharge["referral"]
    response = post(client, "discharge", discharge)
    assert response.status_code == 201, response.get_json()
    return {program["E1"]}


def partners_answer(app: Flask, client: FlaskClient, program: dict[str, Any]) -> set[str]:
    answer(app, program["discharge"], "accepted", "3.0", "Service Request Accepted")
    return {program["E3"]}


def attendance_added(app: Flask, client: FlaskClient, program: dict[str, Any]) -> set[str]:
    attending = [program["E1"], program["E2"], program["E4"]]
    response = client.put(f"/iop/group-sessions/{program['group']['id']}", json=group(attending))
    assert response.status_code == 200, response.get_json()
    return set(attending)  # every attendee's stay is built again (the group changed); E4's figures change


def attendance_removed(app: Flask, client: FlaskClient, program: dict[str, Any]) -> set[str]:
    response = client.put(f"/iop/group-sessions/{program['group']['id']}", json=group([program["E1"]]))
    assert response.status_code == 200, response.get_json()
    return {program["E1"], program["E2"]}  # both built again; E2's figures change


def edited_enrollment(app: Flask, client: FlaskClient, program: dict[str, Any]) -> set[str]:
    payload = contract("enrollment")
    payload["patient"]["identifiers"][0]["value"] = "MRN-C-4"
    payload["admission_date"] = "2026-01-12"
    response = client.put(f"/iop/enrollments/{program['E4']}", json=payload)
    assert response.status_code == 200, response.get_json()
    return {program["E4"]}


CHANGES: dict[str, Callable[[Flask, FlaskClient, dict[str, Any]], set[str]]] = {
    "a new session": new_session,
    "a retracted session": retracted_session,
    "an edited assessment": edited_assessment,
    "a new discharge": new_discharge,
    "a partner's answer on the referral Task": partners_answer,
    "a group session attendance added": attendance_added,
    "a group session attendance removed": attendance_removed,
    "an edited enrollment": edited_enrollment,
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=list(CHANGES))
def test_after_a_write_only_the_stays_it_touched_are_built_again_and_every_answer_is_a_fresh_ones(
    app: Flask,
    client: FlaskClient,
    program: dict[str, Any],
    built: list[str],
    change: Callable[[Flask, FlaskClient, dict[str, Any]], set[str]],
) -> None:
    answered(client, OUTCOMES)
    stays_before = [answered(client, path) for path in each_stay(program)]
    touched = change(app, client, program)
    built.clear()
    after = answered(client, OUTCOMES)
    assert set(built) == touched
    assert after == fresh(app, client, OUTCOMES)
    stays_after = [answered(client, path) for path in each_stay(program)]
    assert stays_after == [fresh(app, client, path) for path in each_stay(program)]
    # the write changed what a touched stay counts, and nothing of the others
    names = {program[f"E{n}"]: n - 1 for n in range(1, 5)}
    changed = {eid for eid, n in names.items() if stays_after[n] != stays_before[n]}
    assert changed and changed <= touched


@pytest.fixture
def second_process(settings: Settings) -> Iterator[Flask]:
    """Another app process on the same database, with a reader of its own."""
    other = create_app(settings)
    try:
        yield other
    finally:
        other.extensions["iop_fhir.store"].close()


def test_a_write_through_one_process_is_seen_by_anothers_next_request(
    app: Flask, client: FlaskClient, program: dict[str, Any], second_process: Flask, built: list[str]
) -> None:
    other = second_process.test_client()
    assert app.extensions["iop_fhir.outcomes"] is not second_process.extensions["iop_fhir.outcomes"]
    before = answered(other, OUTCOMES)
    assert answered(other, OUTCOMES) == before
    for change in (new_session, partners_answer, attendance_removed):
        built.clear()
        touched = change(app, client, program)
        after = answered(other, OUTCOMES)
        assert set(built) == touched
        assert after == fresh(app, client, OUTCOMES) == answered(client, OUTCOMES)
        assert after != before
        before = after


def test_the_cache_keeps_the_most_recently_used_stays_up_to_its_size(
    app: Flask, client: FlaskClient, program: dict[str, Any], built: list[str]
) -> None:
    reader: Reader = app.extensions["iop_fhir.outcomes"]
    app.extensions["iop_fhir.outcomes"] = replace(reader, cache=StayCache(size=2))
    try:
        first = answered(client, OUTCOMES)
        assert len(app.extensions["iop_fhir.outcomes"].cache) == 2
        built.clear()
        assert answered(client, OUTCOMES) == first
        # the two kept are taken, the two others built again (and kept in their place)
        assert len(built) == 2 and len(app.extensions["iop_fhir.outcomes"].cache) == 2
        answered(client, f"/iop/enrollments/{program['E4']}/outcomes")
        built.clear()
        answered(client, f"/iop/enrollments/{program['E4']}/outcomes")
        assert built == []
    finally:
        app.extensions["iop_fhir.outcomes"] = reader
