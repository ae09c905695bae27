"""The program reports an outcome reader keeps computed (outcomes/load.py ReportCache): a request after no change
computes no report and answers the same one, audited with the same resources; a write to one stay, another period,
program or set of patients, or another day computes its own report, the one a reader with nothing kept computes."""

from __future__ import annotations

from dataclasses import replace
from datetime import date
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from iop_fhir.iop import outcomes
from iop_fhir.outcomes import program as figures
from iop_fhir.outcomes.load import Reader, ReportCache, StayCache
from iop_fhir.outcomes.program import Period
from iop_fhir.store.base import AuditQuery
from tests.outcomes.test_stay_cache import OUTCOMES, answered, new_session, program

__all__ = ["program"]  # the stays of test_stay_cache, a fixture here too


@pytest.fixture
def computed(monkeypatch: pytest.MonkeyPatch) -> list[Period]:
    """The periods of the program reports computed, in order."""
    seen: list[Period] = []
    compute = figures.outcomes

    def counted(stays: Any, rules: Any, period: Period, *args: Any, **kwargs: Any) -> Any:
        seen.append(period)
        return compute(stays, rules, period, *args, **kwargs)

    monkeypatch.setattr(figures, "outcomes", counted)
    return seen


def fresh(app: Flask, client: FlaskClient, path: str) -> dict[str, Any]:
    """The answer of a reader that keeps neither stays nor reports."""
    kept: Reader = app.extensions["iop_fhir.outcomes"]
    app.extensions["iop_fhir.outcomes"] = replace(kept, cache=StayCache(), reports=ReportCache())
    try:
        return answered(client, path)
    finally:
        app.extensions["iop_fhir.outcomes"] = kept


def audited(app: Flask, client: FlaskClient, path: str) -> tuple[dict[str, Any], list[tuple[Any, ...]]]:
    """The answer to ``path`` and the audit rows it left (who, what, which patient and resources)."""
    store = app.extensions["iop_fhir.store"]
    app.extensions["iop_fhir.audit"].flush()
    before = {r.id for r in store.audit_rows(AuditQuery(count=10_000))[0]}
    body = answered(client, path)
    app.extensions["iop_fhir.audit"].flush()
    rows = [r for r in store.audit_rows(AuditQuery(count=10_000))[0] if r.id not in before]
    return body, sorted((r.action, r.outcome, r.patient, tuple(sorted(r.entities)), r.query) for r in rows)


def test_a_repeated_request_with_nothing_written_answers_the_kept_report_without_computing_it(
    app: Flask, client: FlaskClient, program: dict[str, Any], computed: list[Period]
) -> None:
    first = answered(client, OUTCOMES)
    assert first["stays"] == 4 and len(computed) == 1
    assert answered(client, OUTCOMES) == first
    csv = client.get(OUTCOMES, headers={"Accept": "text/csv"})
    assert csv.status_code == 200 and csv.mimetype == "text/csv"
    assert len(computed) == 1
    assert len(app.extensions["iop_fhir.outcomes"].reports) == 1


def test_a_cached_answer_is_audited_with_the_resources_of_the_first(
    app: Flask, client: FlaskClient, program: dict[str, Any], computed: list[Period]
) -> None:
    first, rows = audited(app, client, OUTCOMES)
    again, rows_again = audited(app, client, OUTCOMES)
    assert len(computed) == 1
    assert again == first
    assert rows and rows_again == rows
    named = {entity for row in rows for entity in row[3]}
    for name in ("E1", "E2", "E3", "E4"):
        enrollment = client.get(f"/iop/enrollments/{program[name]}").get_json()
        assert set(enrollment["fhir"]) <= named


def test_after_a_write_to_one_stay_the_report_is_computed_again_as_a_fresh_reader_would(
    app: Flask, client: FlaskClient, program: dict[str, Any], computed: list[Period]
) -> None:
    before = answered(client, OUTCOMES)
    new_session(app, client, program)
    computed.clear()
    after = answered(client, OUTCOMES)
    assert len(computed) == 1
    assert after != before
    assert after == fresh(app, client, OUTCOMES)
    computed.clear()
    assert answered(client, OUTCOMES) == after
    assert computed == []


def test_a_retracted_enrollment_leaves_the_period_and_the_report_is_computed_again(
    app: Flask, client: FlaskClient, program: dict[str, Any], computed: list[Period]
) -> None:
    assert answered(client, OUTCOMES)["stays"] == 4
    response = client.post(f"/iop/enrollments/{program['E4']}/retract", json={"reason": "entered in error"})
    assert response.status_code == 200, response.get_json()
    computed.clear()
    after = answered(client, OUTCOMES)
    assert len(computed) == 1 and after["stays"] == 3
    assert after == fresh(app, client, OUTCOMES)


QUERIES = {
    "another period": "/iop/outcomes?from=2026-01-01&to=2026-01-31",
    "a program": "/iop/outcomes?from=2026-01-01&to=2026-03-31&program={program}",
}


@pytest.mark.parametrize("path", QUERIES.values(), ids=list(QUERIES))
def test_another_query_gets_a_report_of_its_own(
    app: Flask, client: FlaskClient, program: dict[str, Any], computed: list[Period], path: str
) -> None:
    code = client.get(f"/iop/enrollments/{program['E1']}").get_json()["program"]
    other = path.format(program=code)
    first = answered(client, OUTCOMES)
    answer = answered(client, other)
    assert len(computed) == 2
    assert answer == fresh(app, client, other)
    computed.clear()
    assert answered(client, OUTCOMES) == first
    assert answered(client, other) == answer
    assert computed == []
    assert len(app.extensions["iop_fhir.outcomes"].reports) == 2


def test_the_stays_of_a_set_of_patients_get_a_report_of_their_own(
    app: Flask, client: FlaskClient, program: dict[str, Any], computed: list[Period]
) -> None:
    reader: Reader = app.extensions["iop_fhir.outcomes"]
    patient = reader.stays(enrollment_id=program["E1"]).stays[0].patient
    assert patient is not None
    query = outcomes.Query(None, Period(date(2026, 1, 1), date(2026, 3, 31)))

    def ask(patients: frozenset[str] | None) -> dict[str, Any]:
        return outcomes.program_outcomes(query, each=False, patients=patients)[0]

    with app.test_request_context(OUTCOMES):
        every = ask(None)
        one = ask(frozenset({patient}))
        assert len(computed) == 2
        assert every["stays"] == 4 and one["stays"] == 1
        assert ask(frozenset({patient})) == one and ask(None) == every
        assert len(computed) == 2


def test_the_report_is_computed_again_on_another_day(
    app: Flask, client: FlaskClient, program: dict[str, Any], computed: list[Period], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outcomes, "today", lambda: date(2026, 2, 1))
    first = answered(client, OUTCOMES)
    assert answered(client, OUTCOMES) == first and len(computed) == 1
    monkeypatch.setattr(outcomes, "today", lambda: date(2026, 2, 2))
    next_day = answered(client, OUTCOMES)
    assert len(computed) == 2
    assert next_day["as_of"] == "2026-02-02" != first["as_of"]
    assert next_day == fresh(app, client, OUTCOMES)


def test_the_pages_take_the_kept_report_and_stays(
    app: Flask, client: FlaskClient, program: dict[str, Any], computed: list[Period]
) -> None:
    path = OUTCOMES.replace("/iop/outcomes?", "/iop/outcomes.html?")
    first = client.get(path)
    assert first.status_code == 200
    again = client.get(path)
    assert again.status_code == 200 and again.get_data() == first.get_data()
    assert len(computed) == 1
    for name in ("E1", "E2", "E3", "E4"):
        assert f"/iop/enrollments/{program[name]}/outcomes.html" in again.get_data(as_text=True)


def test_the_reports_kept_are_the_most_recently_used_up_to_the_size(
    app: Flask, client: FlaskClient, program: dict[str, Any], computed: list[Period]
) -> None:
    reader: Reader = app.extensions["iop_fhir.outcomes"]
    app.extensions["iop_fhir.outcomes"] = replace(reader, reports=ReportCache(size=1))
    try:
        first = answered(client, OUTCOMES)
        answered(client, QUERIES["another period"])
        assert len(app.extensions["iop_fhir.outcomes"].reports) == 1
        computed.clear()
        assert answered(client, OUTCOMES) == first
        assert len(computed) == 1
    finally:
        app.extensions["iop_fhir.outcomes"] = reader
