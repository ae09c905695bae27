"""The program's figures as FHIR Measures and $evaluate-measure: each Measure counts what program.outcomes counts
(hand-built stays, and a program seeded through /iop), the operation's parameters, scopes and errors, and Part 2: a
partner's client counts only consented patients' stays, cannot tell a hidden subject from an unknown one, leaves an
audit row per patient counted, and cannot read a stored summary report."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from iop_fhir.app import create_app
from iop_fhir.config import REPO, Settings
from iop_fhir.mapping.engine import PART2_LABELS
from iop_fhir.outcomes import measures, program, rules
from iop_fhir.outcomes.program import Period
from iop_fhir.outcomes.stays import Score, Screen, Session, Stay
from iop_fhir.store.base import AuditQuery
from tests.auth import mint
from tests.privacy.scenario import PARTNER, as_client, contract, issue

OUTCOMES = REPO / "mappings" / "outcomes"
VALIDATOR = REPO.parent / "shared" / "tools" / "fhir-validate"
RULES = rules.load(OUTCOMES)
DEFINITIONS = measures.load(OUTCOMES)
PERIOD = Period(date(2026, 1, 1), date(2026, 3, 31))
TODAY = date(2026, 6, 1)
FHIR = "application/fhir+json"
Q1 = "periodStart=2026-01-01&periodEnd=2026-03-31"

# The figure of program.outcomes each Measure is (its key in the JSON report).
FIGURES = {
    "iop-retention-30": "retention.30_days",
    "iop-retention-60": "retention.60_days",
    "iop-retention-90": "retention.90_days",
    "iop-completion": "completion",
    "iop-attendance": "attendance",
    "iop-asam-minimum": "asam_minimum",
    "iop-negative-screens": "drug_screens",
    "iop-phq9-response": "phq9_response",
    "iop-phq9-remission": "phq9_remission",
    "iop-aftercare-accepted": "aftercare_accepted",
    "iop-aftercare-first-visit": "aftercare_first_visit",
}


def _session(day: str, attendance: str, hours: float = 3.0, screen: tuple[tuple[str, str], ...] = ()) -> Session:
    on = date.fromisoformat(day)
    return Session(on, "group-therapy", attendance, hours, screen=Screen(on, screen) if screen else None)


def _phq9(*values: tuple[str, int]) -> dict[str, tuple[Score, ...]]:
    return {"phq-9": tuple(Score(date.fromisoformat(d), v) for d, v in values)}


NEGATIVE = (("opiates", "negative"), ("cannabinoids", "negative"))
# A completed the program with a referral its partner accepted and a first visit 6 days after discharge; B is still
# enrolled; D left against advice after ten days; C was discharged before the period.
A = Stay(
    "enr-a",
    "pa",
    "adult-sud",
    date(2026, 1, 5),
    date(2026, 3, 27),
    "completed",
    sessions=(
        _session("2026-01-07", "attended", screen=NEGATIVE),
        _session("2026-01-08", "no-show"),
        _session("2026-01-09", "cancelled-by-program"),
    ),
    scores=_phq9(("2026-01-05", 15), ("2026-03-20", 4)),
    referral={"partner": PARTNER, "service": "outpatient-sud-counseling"},
    transition=({"event": "accepted", "at": "2026-03-28"}, {"event": "first-visit-attended", "at": "2026-04-02"}),
)
B = Stay(
    "enr-b",
    "pb",
    "adult-sud",
    date(2026, 2, 20),
    sessions=(_session("2026-02-23", "late", 1.0, screen=(("cannabinoids", "positive"),)),),
    scores=_phq9(("2026-02-20", 12), ("2026-03-20", 9)),
)
C = Stay("enr-c", "pc", "adult-sud", date(2025, 11, 1), date(2025, 12, 15), "completed")
D = Stay(
    "enr-d",
    "pd",
    "adolescent-sud",
    date(2026, 3, 1),
    date(2026, 3, 10),
    "against-advice",
    sessions=(
        _session("2026-03-01", "attended", 1.0, screen=(("opiates", "inconclusive"),)),
        _session("2026-03-02", "no-show"),
    ),
    scores=_phq9(("2026-03-01", 8), ("2026-03-09", 2)),
)
STAYS = [A, B, C, D]

# (initial population, denominator, numerator) of each Measure over STAYS for PERIOD, counted by hand.
EXPECTED = {
    "iop-retention-30": (3, 3, 2),  # admitted A, B, D; D left on day 9
    "iop-retention-60": (3, 1, 1),  # only A's day 60 (March 6) has come by March 31
    "iop-retention-90": (3, 0, 0),
    "iop-completion": (3, 2, 1),  # A, B, D enrolled; A and D discharged; A completed
    "iop-attendance": (5, 5, 3),  # the session the program cancelled is not scheduled
    "iop-asam-minimum": (22, 22, 1),  # A 12 weeks, B 7, D 3; only D's first (one day, 1 hour) meets the minimum
    "iop-negative-screens": (3, 3, 1),
    "iop-phq9-response": (3, 2, 1),  # D's first score is below the baseline of 10
    "iop-phq9-remission": (3, 2, 1),
    "iop-aftercare-accepted": (2, 1, 1),
    "iop-aftercare-first-visit": (2, 1, 1),
}


def counts(report: dict[str, Any]) -> tuple[int, ...]:
    populations = {p["code"]["coding"][0]["code"]: p["count"] for p in report["group"][0]["population"]}
    return populations["initial-population"], populations["denominator"], populations["numerator"]


def figure(report: dict[str, Any], key: str) -> dict[str, Any]:
    found: Any = report
    for part in key.split("."):
        found = found[part]
    return dict(found)


# -- the definitions ------------------------------------------------------------------------------------------------


def test_every_program_figure_is_a_measure_of_three_proportion_populations() -> None:
    assert sorted(DEFINITIONS) == sorted(FIGURES)
    for measure_id, measure in DEFINITIONS.items():
        assert measure["url"] == f"https://iop-fhir.org/fhir/Measure/{measure_id}"
        assert measure["status"] == "active" and measure["version"]
        assert measure["scoring"]["coding"][0]["code"] == "proportion"
        assert "meta" not in measure  # no Part 2 labels: a Measure holds no patient's data
        (group,) = measure["group"]
        codes = [p["code"]["coding"][0] for p in group["population"]]
        assert [(c["system"], c["code"]) for c in codes] == [
            (measures.MEASURE_POPULATION, code) for code in measures.PROPORTION
        ]
        for population in group["population"]:
            assert population["criteria"]["language"] == measures.LANGUAGE
            assert population["criteria"]["expression"] in measures.POPULATIONS
            assert population["description"]


def test_a_measure_naming_an_unknown_population_is_refused_when_loaded(tmp_path: Path) -> None:
    broken = json.loads((OUTCOMES / "Measure-iop-attendance.json").read_text())
    broken["group"][0]["population"][2]["criteria"]["expression"] = "sessions-enjoyed"
    (tmp_path / "Measure-broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="sessions-enjoyed"):
        measures.load(tmp_path)


# -- evaluation (pure) ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("measure_id", sorted(EXPECTED))
def test_summary_report_counts_the_populations_of_the_period(measure_id: str) -> None:
    report = measures.evaluation(DEFINITIONS[measure_id], STAYS, RULES, PERIOD, TODAY).report

    assert counts(report) == EXPECTED[measure_id]
    assert (report["type"], report["status"]) == ("summary", "complete")
    assert report["measure"] == f"https://iop-fhir.org/fhir/Measure/{measure_id}|0.1.0"
    assert report["period"] == {"start": "2026-01-01", "end": "2026-03-31"}
    assert report["meta"]["security"] == PART2_LABELS
    assert "subject" not in report
    _, denominator, numerator = EXPECTED[measure_id]
    if denominator:
        assert report["group"][0]["measureScore"] == {"value": round(numerator / denominator, 4)}
    else:
        assert "measureScore" not in report["group"][0]


@pytest.mark.parametrize("measure_id", sorted(FIGURES))
def test_each_measure_agrees_with_the_json_report(measure_id: str) -> None:
    for program_code in (None, "adult-sud", "adolescent-sud"):
        report = measures.evaluation(DEFINITIONS[measure_id], STAYS, RULES, PERIOD, TODAY, program=program_code).report
        json_report = program.outcomes(STAYS, RULES, PERIOD, TODAY, program_code)
        found = figure(json_report, FIGURES[measure_id])
        _, denominator, numerator = counts(report)
        assert (numerator, denominator) == (found["numerator"], found["denominator"]), program_code
        assert report["group"][0].get("measureScore", {}).get("value") == found["rate"]


@pytest.mark.parametrize(("today", "due"), [(date(2026, 4, 5), 0), (date(2026, 4, 11), 1)])
def test_a_referral_whose_first_visit_window_is_open_is_not_yet_counted_by_either(today: date, due: int) -> None:
    # discharged 2026-03-27, accepted, no visit known: the window closes on 2026-04-10
    waiting = replace(A, enrollment_id="enr-w", transition=({"event": "accepted", "at": "2026-03-28"},))
    report = measures.evaluation(DEFINITIONS["iop-aftercare-first-visit"], [waiting], RULES, PERIOD, today).report
    json_report = program.outcomes([waiting], RULES, PERIOD, today)
    assert counts(report)[1:] == (due, 0)
    assert (json_report["aftercare_first_visit"]["denominator"], json_report["aftercare_first_visit"]["numerator"]) == (
        due,
        0,
    )


def test_individual_report_counts_only_the_subjects_stays() -> None:
    attendance = measures.evaluation(DEFINITIONS["iop-attendance"], STAYS, RULES, PERIOD, TODAY, subject="pb").report
    retention = measures.evaluation(DEFINITIONS["iop-retention-30"], STAYS, RULES, PERIOD, TODAY, subject="pa").report

    assert (attendance["type"], attendance["subject"]) == ("individual", {"reference": "Patient/pb"})
    assert counts(attendance) == (1, 1, 1)
    assert counts(retention) == (1, 1, 1)
    assert measures.evaluation(DEFINITIONS["iop-completion"], STAYS, RULES, PERIOD, TODAY, subject="pc").stays == []


def test_program_parameter_counts_one_programs_stays() -> None:
    report = measures.evaluation(
        DEFINITIONS["iop-completion"], STAYS, RULES, PERIOD, TODAY, program="adolescent-sud"
    ).report
    assert counts(report) == (1, 1, 0)


def test_evaluation_names_the_stays_of_its_initial_population() -> None:
    found = measures.evaluation(DEFINITIONS["iop-aftercare-accepted"], STAYS, RULES, PERIOD, TODAY)
    assert [s.enrollment_id for s in found.stays] == ["enr-a", "enr-d"]


# -- the operation over HTTP ----------------------------------------------------------------------------------------


def evaluate(client: FlaskClient, measure_id: str, query: str = Q1, **kwargs: Any) -> Any:
    return client.get(f"/fhir/Measure/{measure_id}/$evaluate-measure?{query}", **kwargs)


@pytest.mark.parametrize(
    ("query", "code", "expression"),
    [
        ("periodEnd=2026-03-31", "required", "periodStart"),
        ("periodStart=2026-01-01", "required", "periodEnd"),
        ("periodStart=2026-13-01&periodEnd=2026-03-31", "invalid", "periodStart"),
        ("periodStart=2026-01-01&periodEnd=yesterday", "invalid", "periodEnd"),
        ("periodStart=2026-03-01&periodEnd=2026-02-28", "invalid", "periodEnd"),
        (f"{Q1}&periodStart=2026-02-01", "invalid", "periodStart"),
        (f"{Q1}&reportType=subject-list", "not-supported", "reportType"),
        (f"{Q1}&reportType=everyone", "invalid", "reportType"),
        (f"{Q1}&reportType=subject", "required", "subject"),
        (f"{Q1}&subject=Group/g1", "invalid", "subject"),
        (f"{Q1}&program=geriatric", "invalid", "program"),
        (f"{Q1}&colour=blue", "not-supported", "colour"),
        (f"{Q1}&practitioner=Practitioner/p", "not-supported", "practitioner"),
    ],
)
def test_bad_parameters_are_a_400_naming_the_parameter(
    client: FlaskClient, query: str, code: str, expression: str
) -> None:
    response = evaluate(client, "iop-attendance", query)
    assert response.status_code == 400
    assert (issue(response)["code"], issue(response)["expression"]) == (code, [expression])


def test_unknown_parameters_are_ignored_under_lenient_handling(client: FlaskClient) -> None:
    response = evaluate(client, "iop-attendance", f"{Q1}&colour=blue", headers={"Prefer": "handling=lenient"})
    assert response.status_code == 200
    assert response.get_json()["resourceType"] == "MeasureReport"


def test_partial_dates_cover_their_whole_month_or_year(client: FlaskClient) -> None:
    response = evaluate(client, "iop-attendance", "periodStart=2026-02&periodEnd=2026")
    assert response.get_json()["period"] == {"start": "2026-02-01", "end": "2026-12-31"}


def test_unknown_measure_is_404(client: FlaskClient) -> None:
    response = evaluate(client, "iop-happiness")
    assert response.status_code == 404
    assert issue(response)["code"] == "not-found"


def test_unknown_subject_is_404_naming_the_subject(client: FlaskClient) -> None:
    response = evaluate(client, "iop-attendance", f"{Q1}&subject=Patient/nobody")
    assert response.status_code == 404
    assert (issue(response)["code"], issue(response)["expression"]) == ("not-found", ["subject"])


@pytest.mark.parametrize("missing", ["MeasureReport", "Task", "Observation", "Patient"])
def test_evaluating_needs_read_scope_on_the_report_and_every_source_type(
    app: Flask, client: FlaskClient, missing: str
) -> None:
    types = ["Measure", "MeasureReport", "Patient", "EpisodeOfCare", "Encounter", "Observation", "CarePlan", "Goal"]
    types += ["Task", "MedicationRequest"]
    scope = " ".join(f"system/{t}.rs" for t in types if t != missing)
    limited = as_client(app, mint(app, scope))
    response = evaluate(limited, "iop-attendance")
    assert response.status_code == 403
    assert issue(response)["code"] == "forbidden"
    assert f"on {missing}" in issue(response)["diagnostics"]
    everything = as_client(app, mint(app, " ".join(f"system/{t}.rs" for t in types)))
    assert evaluate(everything, "iop-attendance").status_code == 200


def test_post_with_a_parameters_body_is_the_same_operation(client: FlaskClient, program: dict[str, Any]) -> None:
    patient = program["a"]["patient"]
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "periodStart", "valueDate": "2026-01-01"},
            {"name": "periodEnd", "valueDate": "2026-03-31"},
            {"name": "subject", "valueReference": {"reference": patient}},
        ],
    }
    posted = client.post("/fhir/Measure/iop-attendance/$evaluate-measure", json=body)
    got = evaluate(client, "iop-attendance", f"{Q1}&subject={patient}")
    assert posted.status_code == 200, posted.get_json()
    assert {**posted.get_json(), "date": None} == {**got.get_json(), "date": None}


# -- Part 2 ---------------------------------------------------------------------------------------------------------


def audit_rows(app: Flask, **where: str) -> list[Any]:
    conditions = tuple(((name, value),) for name, value in where.items())
    rows, _ = app.extensions["iop_fhir.store"].audit_rows(AuditQuery(where=conditions, count=1000))
    return list(rows)


def test_a_partner_counts_only_the_stays_of_consented_patients(app: Flask, program: dict[str, Any]) -> None:
    own = as_client(app, mint(app))
    everyone = evaluate(own, "iop-attendance")
    partner = evaluate(program["partner"], "iop-attendance")

    assert counts(everyone.get_json()) == (2, 2, 2)  # A's and B's one session each
    assert partner.status_code == 200
    assert counts(partner.get_json()) == (1, 1, 1)


def test_a_partners_evaluation_leaves_an_audit_row_for_each_patient_counted(
    app: Flask, program: dict[str, Any]
) -> None:
    assert evaluate(program["partner"], "iop-completion").status_code == 200

    rows = audit_rows(app, on_behalf_of=f"Organization/{PARTNER}", action="operation")
    assert [row.patient for row in rows] == [program["a"]["patient"]]
    assert program["a"]["episode"] in rows[0].entities
    assert rows[0].query.startswith("/fhir/Measure/iop-completion/$evaluate-measure?")
    assert not audit_rows(app, patient=program["b"]["patient"], action="operation")


def test_a_hidden_subject_is_answered_as_an_unknown_one(program: dict[str, Any]) -> None:
    partner = program["partner"]
    hidden = evaluate(partner, "iop-attendance", f"{Q1}&subject={program['b']['patient']}")
    unknown = evaluate(partner, "iop-attendance", f"{Q1}&subject=Patient/nobody")

    assert hidden.status_code == unknown.status_code == 404
    b_id = program["b"]["patient"].split("/", 1)[1]
    assert issue(hidden) == {**issue(unknown), "diagnostics": issue(unknown)["diagnostics"].replace("nobody", b_id)}


def test_a_partner_gets_the_individual_report_of_a_consented_patient(program: dict[str, Any]) -> None:
    patient = program["a"]["patient"]
    response = evaluate(program["partner"], "iop-attendance", f"{Q1}&subject={patient.split('/', 1)[1]}")
    assert response.status_code == 200
    report = response.get_json()
    assert (report["type"], report["subject"]) == ("individual", {"reference": patient})
    assert counts(report) == (1, 1, 1)


def test_a_stored_summary_report_is_invisible_to_a_partner(app: Flask, program: dict[str, Any]) -> None:
    own = as_client(app, mint(app))
    summary = evaluate(own, "iop-attendance").get_json()
    of_a = evaluate(own, "iop-attendance", f"{Q1}&subject={program['a']['patient']}").get_json()
    of_b = evaluate(own, "iop-attendance", f"{Q1}&subject={program['b']['patient']}").get_json()
    ids = {}
    for name, report in (("summary", summary), ("a", of_a), ("b", of_b)):
        stored = own.post("/fhir/MeasureReport", json=report, headers={"Content-Type": FHIR})
        assert stored.status_code == 201, stored.get_json()
        ids[name] = stored.get_json()["id"]
    partner = program["partner"]

    assert partner.get(f"/fhir/MeasureReport/{ids['summary']}").status_code == 404
    assert partner.get(f"/fhir/MeasureReport/{ids['b']}").status_code == 404
    assert partner.get(f"/fhir/MeasureReport/{ids['a']}").status_code == 200
    found = partner.get("/fhir/MeasureReport").get_json()
    assert [e["resource"]["id"] for e in found.get("entry", [])] == [ids["a"]]
    assert own.get("/fhir/MeasureReport?_summary=count").get_json()["total"] == 3


def test_an_invalid_report_is_refused_when_stored(client: FlaskClient) -> None:
    report = evaluate(client, "iop-attendance").get_json()
    report["status"] = "finished"
    response = client.post("/fhir/MeasureReport", json=report, headers={"Content-Type": FHIR})
    assert response.status_code == 400


# -- serving the Measures -------------------------------------------------------------------------------------------


@pytest.fixture
def seeded_app(settings: Settings) -> Iterator[Flask]:
    """The app with the conformance resources (the Measures among them) seeded at start."""
    app = create_app(replace(settings, seed_conformance=True))
    app.config["TESTING"] = True
    yield app
    app.extensions["iop_fhir.store"].close()


def test_measures_are_seeded_and_served_to_partners_too(seeded_app: Flask) -> None:
    own = seeded_app.test_client()
    listed = own.get("/fhir/Measure?_count=50").get_json()
    assert sorted(e["resource"]["id"] for e in listed["entry"]) == sorted(FIGURES)
    by_url = own.get("/fhir/Measure?url=https://iop-fhir.org/fhir/Measure/iop-attendance").get_json()
    assert [e["resource"]["id"] for e in by_url["entry"]] == ["iop-attendance"]
    assert own.post("/iop/partners", json=contract("partner")).status_code == 201
    partner = as_client(seeded_app, mint(seeded_app, "system/*.rs", partner=PARTNER))
    read = partner.get("/fhir/Measure/iop-completion")
    assert read.status_code == 200
    assert read.get_json()["name"] == "IopCompletion"


def test_capability_statement_declares_evaluate_measure_on_measure(client: FlaskClient) -> None:
    statement = client.get("/fhir/metadata").get_json()
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    operations = {o["name"]: o["definition"] for o in resources["Measure"]["operation"]}
    assert operations["evaluate-measure"] == "http://hl7.org/fhir/OperationDefinition/Measure-evaluate-measure"
    assert {"read", "search-type"} <= {i["code"] for i in resources["Measure"]["interaction"]}
    assert {"read", "create", "search-type"} <= {i["code"] for i in resources["MeasureReport"]["interaction"]}


# -- a program seeded through /iop ----------------------------------------------------------------------------------


def _record(client: FlaskClient, path: str, payload: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"/iop/{path}", json=payload)
    assert response.status_code == 201, response.get_json()
    body: dict[str, Any] = response.get_json()
    return body


def test_evaluate_measure_agrees_with_the_outcomes_of_a_program_seeded_through_iop(
    app: Flask, client: FlaskClient
) -> None:
    assert client.post("/iop/partners", json=contract("partner")).status_code == 201
    for mrn, attendances, discharged in (("MRN-1", ["attended", "no-show"], True), ("MRN-2", ["late"], False)):
        enrollment = contract("enrollment")
        enrollment["patient"]["identifiers"][0]["value"] = mrn
        enrollment_id = _record(client, "enrollments", enrollment)["id"]
        for day, attendance in enumerate(attendances, 7):
            session = contract("session", enrollment_id)
            session.update(start=f"2026-01-{day:02}T18:00:00-05:00", end=f"2026-01-{day:02}T21:00:00-05:00")
            session["attendance"] = attendance
            session["drug_screen"]["collected_at"] = session["start"]
            _record(client, "sessions", session)
        if discharged:
            discharge = contract("discharge", enrollment_id)
            del discharge["goal_outcomes"]  # this enrollment has no treatment plan whose goals they would name
            _record(client, "discharges", discharge)
    reader = app.extensions["iop_fhir.outcomes"]
    json_report = program.outcomes(reader.stays().stays, reader.rules, PERIOD, date.today())

    for measure_id in ("iop-attendance", "iop-completion"):
        report = evaluate(client, measure_id).get_json()
        found = figure(json_report, FIGURES[measure_id])
        _, denominator, numerator = counts(report)
        assert (numerator, denominator) == (found["numerator"], found["denominator"])
    assert figure(json_report, "attendance")["denominator"] == 3
    assert figure(json_report, "completion") == {"numerator": 1, "denominator": 1, "rate": 1.0}


# -- validity -------------------------------------------------------------------------------------------------------


@pytest.mark.peers
def test_every_emitted_measure_report_and_measure_is_valid_r4(
    tmp_path: Path, client: FlaskClient, program: dict[str, Any]
) -> None:
    emitted = {}
    for measure_id in sorted(FIGURES):
        emitted[f"summary-{measure_id}"] = evaluate(client, measure_id).get_json()
        subject = program["a"]["patient"]
        emitted[f"individual-{measure_id}"] = evaluate(client, measure_id, f"{Q1}&subject={subject}").get_json()
    emitted["partner"] = evaluate(program["partner"], "iop-retention-30").get_json()
    emitted["empty"] = measures.evaluation(DEFINITIONS["iop-retention-90"], [], RULES, PERIOD, TODAY).report
    for name, body in emitted.items():
        assert body["resourceType"] == "MeasureReport", body
        (tmp_path / f"{name}.json").write_text(json.dumps(body))
    for path in sorted(OUTCOMES.glob("Measure-*.json")):
        (tmp_path / path.name).write_text(path.read_text())
    checked = subprocess.run([str(VALIDATOR), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stdout[-4000:]
