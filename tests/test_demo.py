"""`iop-fhir demo`: the synthetic program it seeds through the API (seeded once for the module), that seeding again
changes nothing, and the command itself."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask import Flask
from sqlalchemy import func, select

from iop_fhir import demo
from iop_fhir.app import create_app
from iop_fhir.cli import main
from iop_fhir.config import Settings
from iop_fhir.demo import cohort, seeding
from iop_fhir.exchange import followup
from iop_fhir.mapping import ids
from iop_fhir.outcomes import program
from iop_fhir.outcomes.patient import classify
from iop_fhir.r4.validation import validate
from iop_fhir.security.registry import issue_for_client
from iop_fhir.store import schema
from iop_fhir.store.base import AuditQuery, StoredRecord
from tests.outcomes.test_measures import FIGURES

VALIDATOR = Path(__file__).resolve().parents[2] / "shared" / "tools" / "fhir-validate"
ATTENDED = ("attended", "late", "left-early")
MOUD_ANALYTES = {"buprenorphine", "methadone"}  # what the screens of patients on MOUD show as prescribed


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> Iterator[tuple[Flask, demo.DemoSummary]]:
    """An app on a database seeded with the default demo (25 patients, seed 2026)."""
    path = tmp_path_factory.mktemp("demo") / "demo.db"
    shutil.copy(sqlite_template, path)
    settings = Settings(database_url=f"sqlite:///{path}", base_url="http://testserver/fhir", seed_conformance=False)
    app = create_app(settings)
    summary = demo.seed(app)
    yield app, summary
    app.extensions["iop_fhir.store"].close()


@pytest.fixture(scope="module")
def app(seeded: tuple[Flask, demo.DemoSummary]) -> Flask:
    return seeded[0]


def records(app: Flask, kind: str) -> list[StoredRecord]:
    store = app.extensions["iop_fhir.store"]
    found: list[StoredRecord] = []
    while True:
        page, total = store.records(kind, offset=len(found), count=500)
        found.extend(page)
        if not page or len(found) >= total:
            return found


def by_enrollment(app: Flask, kind: str) -> dict[str | None, list[dict[str, Any]]]:
    grouped: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for record in records(app, kind):
        grouped[record.enrollment_id].append(record.content)
    return grouped


def current_resources(app: Flask) -> list[tuple[str, str, dict[str, Any]]]:
    engine = app.extensions["iop_fhir.store"].engine
    query = select(schema.resources.c.res_type, schema.resources.c.res_id, schema.resources.c.content).where(
        schema.resources.c.deleted.is_(False)
    )
    with engine.connect() as conn:
        return [(t, i, orjson.loads(content)) for t, i, content in conn.execute(query)]


def history_by_type(app: Flask) -> dict[str, int]:
    engine = app.extensions["iop_fhir.store"].engine
    query = select(schema.history.c.res_type, func.count()).group_by(schema.history.c.res_type)
    with engine.connect() as conn:
        return {t: n for t, n in conn.execute(query)}


def day_of(moment: str) -> date:
    return datetime.fromisoformat(moment).date()


# -- what is seeded -----------------------------------------------------------------------------------------------


def test_seeding_enrolls_25_patients_each_with_an_intake_assessment_a_treatment_plan_and_sessions(app: Flask) -> None:
    enrollments = records(app, "enrollment")
    assert len(enrollments) == 25
    assessments, plans, sessions = (by_enrollment(app, k) for k in ("assessment", "treatment-plan", "session"))
    for enrollment in enrollments:
        assert [a["kind"] for a in assessments[enrollment.id]][0] == "intake"
        assert len(plans[enrollment.id]) == 1
        assert len(sessions[enrollment.id]) >= 3 * 3  # at least three weeks, three blocks a week
        assert enrollment.content["referral"]["service_request"].startswith("http://testserver/fhir/ServiceRequest/")


def test_each_person_is_one_patient_whether_referred_enrolled_or_both(app: Flask) -> None:
    patients = [content for res_type, _, content in current_resources(app) if res_type == "Patient"]
    holders: dict[tuple[str, str], set[str]] = defaultdict(set)
    for patient in patients:
        for identifier in patient.get("identifier", []):
            if identifier.get("system") != ids.RECORD_SYSTEM:
                holders[(identifier["system"], identifier["value"])].add(patient["id"])
    assert holders and all(len(found) == 1 for found in holders.values()), holders
    enrolled = [e["reference"] for r in records(app, "enrollment") for e in r.resources if e["role"] == "patient"]
    assert set(enrolled) <= {f"Patient/{p['id']}" for p in patients}


def test_completed_stays_have_eight_weeks_of_at_least_three_sessions_a_week(app: Flask) -> None:
    sessions = by_enrollment(app, "session")
    completed = [d for d in records(app, "discharge") if d.content["reason"] == "completed"]
    assert len(completed) >= 13
    for discharge in completed:
        admission = date.fromisoformat(enrollment_of(app, discharge.enrollment_id)["admission_date"])
        weeks = Counter((day_of(s["start"]) - admission).days // 7 for s in sessions[discharge.enrollment_id])
        assert sorted(weeks) == list(range(8))
        assert all(n >= 3 for n in weeks.values()), weeks


def enrollment_of(app: Flask, enrollment_id: str | None) -> dict[str, Any]:
    found = app.extensions["iop_fhir.store"].record("enrollment", enrollment_id)
    assert found is not None
    content: dict[str, Any] = found.content
    return content


def test_sessions_are_mostly_attended_some_missed_some_by_telehealth_or_telephone(app: Flask) -> None:
    sessions = [s.content for s in records(app, "session")]
    attendance = Counter(s["attendance"] for s in sessions)
    assert sum(attendance[a] for a in ATTENDED) > 0.8 * len(sessions)
    assert attendance["no-show"] > 0 and attendance["excused-absence"] > 0
    assert attendance["cancelled-by-program"] > 0  # the program's holidays
    assert {s["modality"] for s in sessions} == {"in-person", "telehealth", "telephone"}
    services = {s["service"] for s in sessions}
    assert {"group-therapy", "individual-counseling", "family-therapy", "psychoeducation", "mindfulness"} <= services
    assert {s.get("approach") for s in sessions} >= {"cbt", "dbt", "motivational-interviewing"}
    assert all(0 <= s["craving_score"] <= 10 for s in sessions if s["attendance"] in ATTENDED)


def test_drug_screens_are_weekly_some_positive_and_buprenorphine_positive_as_prescribed(app: Flask) -> None:
    plans = {r.enrollment_id: r.content for r in records(app, "treatment-plan")}
    on_buprenorphine = {e for e, p in plans.items() if any("buprenorphine" in g["description"] for g in p["goals"])}
    assert on_buprenorphine
    weekly: Counter[tuple[str | None, int]] = Counter()
    positive: Counter[str] = Counter()
    for session in records(app, "session"):
        screen = session.content.get("drug_screen")
        if screen is None:
            continue
        assert session.content["attendance"] in ("attended", "late") and session.content["modality"] == "in-person"
        results = {r["analyte"]: r["result"] for r in screen["results"]}
        admission = date.fromisoformat(enrollment_of(app, session.enrollment_id)["admission_date"])
        weekly[(session.enrollment_id, (day_of(screen["collected_at"]) - admission).days // 7)] += 1
        assert (results["buprenorphine"] == "positive") == (session.enrollment_id in on_buprenorphine)
        positive.update(a for a, r in results.items() if r == "positive" and a != "buprenorphine")
    assert set(weekly.values()) == {1}
    assert positive["fentanyl"] > 0 and sum(positive.values()) > 10, positive


def test_discharges_include_completed_against_advice_and_transferred_and_every_patient_is_discharged(
    app: Flask,
) -> None:
    discharges = records(app, "discharge")
    reasons = Counter(d.content["reason"] for d in discharges)
    assert reasons["completed"] > len(discharges) / 2
    assert reasons["against-advice"] >= 1 and reasons["transferred"] >= 1
    assert {"stepped-down", "stepped-up"} <= set(reasons)
    assert {d.enrollment_id for d in discharges} == {e.id for e in records(app, "enrollment")}
    for discharge in discharges:
        referral = discharge.content.get("referral")
        if discharge.content["reason"] == "transferred":
            assert referral is not None and referral["partner"] == cohort.INPATIENT_UNIT
        elif discharge.content["reason"] in ("completed", "stepped-down"):
            assert referral is not None and referral["partner"] in (cohort.OUTPATIENT_CLINIC, cohort.PEER_PROGRAM)
        else:
            assert referral is None


def test_aftercare_transitions_are_queued_and_blocked_where_the_patient_gave_no_consent(app: Flask) -> None:
    client = app.test_client()
    consents = by_enrollment(app, "consent")
    queued, blocked = 0, 0
    for discharge in records(app, "discharge"):
        partner = (discharge.content.get("referral") or {}).get("partner")
        if partner is None:
            continue
        answer = client.get(f"/iop/discharges/{discharge.id}").get_json()
        status = answer["transition"]["delivery"]["status"]
        consented = any(c["recipient"] == partner for c in consents[discharge.enrollment_id])
        assert status == ("pending" if consented else "blocked"), (discharge.id, partner)
        queued += status == "pending"
        blocked += status == "blocked"
    assert queued > 10 and blocked >= 1
    listed = client.get("/iop/deliveries?status=blocked&count=100").get_json()
    assert listed["total"] >= blocked


def test_a_consent_signed_after_discharge_released_the_waiting_transition(app: Flask) -> None:
    released = 0
    discharges = {d.enrollment_id: d for d in records(app, "discharge")}
    for consent in records(app, "consent"):
        discharge = discharges[consent.enrollment_id]
        if consent.content["signed_on"] > discharge.content["discharge_date"]:
            rows, _ = app.extensions["iop_fhir.store"].deliveries(record_kind="discharge", record_id=discharge.id)
            assert [r.status for r in rows] == ["superseded", "pending"]
            released += 1
    assert released == 1


def test_referrals_include_declined_and_no_show_and_every_admission_completed_its_task(app: Flask) -> None:
    client = app.test_client()
    referrals = client.get("/iop/referrals?count=100").get_json()["items"]
    statuses = Counter(r["status"] for r in referrals)
    assert statuses["admitted"] == 25 and statuses["declined"] >= 1 and statuses["no-show"] >= 1
    assert {r["referring"]["partner"] for r in referrals} == {cohort.INPATIENT_UNIT}
    for referral in referrals:
        task = client.get(f"/fhir/{referral['task']}").get_json()
        expected = {"admitted": "completed", "declined": "rejected", "no-show": "failed"}[referral["status"]]
        assert task["status"] == expected


def test_the_whole_program_lies_in_the_past(app: Flask, seeded: tuple[Flask, demo.DemoSummary]) -> None:
    summary = seeded[1]
    assert date.fromisoformat(summary.first_day) == cohort.START
    assert date.fromisoformat(summary.last_day) < date.today()
    latest = max(day_of(s.content["end"]) for s in records(app, "session"))
    assert latest <= date.fromisoformat(summary.last_day)


def test_a_partners_client_sees_only_the_patients_who_consent_to_it(app: Flask) -> None:
    today = date.today().isoformat()
    consenting = set()
    for consent in records(app, "consent"):
        content = consent.content
        if content["recipient"] == cohort.HOSPITAL_EHR and not content.get("revoked_on"):
            assert content["expires_on"] > today
            patient = next(r for r in patients_of(app, consent.enrollment_id) if r.startswith("Patient/"))
            consenting.add(patient.split("/", 1)[1])
    token = issue_for_client(
        app.extensions["iop_fhir.clients"], app.extensions["iop_fhir.keys"], seeding.EHR_CLIENT, None
    )[0]
    bundle = app.test_client().get("/fhir/Patient?_count=100", headers={"Authorization": f"Bearer {token}"}).get_json()
    assert {e["resource"]["id"] for e in bundle.get("entry", [])} == consenting
    assert 0 < len(consenting) < 25


def patients_of(app: Flask, enrollment_id: str | None) -> list[str]:
    found = app.extensions["iop_fhir.store"].record("enrollment", enrollment_id)
    assert found is not None
    return [r["reference"] for r in found.resources if r["role"] == "patient"]


def test_the_summary_counts_what_the_store_holds(app: Flask, seeded: tuple[Flask, demo.DemoSummary]) -> None:
    summary = seeded[1]
    assert summary.patients == 25
    assert summary.records["session"] == len(records(app, "session"))
    assert summary.referrals["admitted"] == 25
    assert summary.deliveries["pending"] > 0 and summary.deliveries["blocked"] > 0
    assert summary.resources["Encounter"] == summary.records["session"]
    assert summary.audit_events >= summary.requests
    assert summary.example["enrollment"] == records(app, "enrollment")[0].id
    text = str(summary)
    assert f"GET /iop/enrollments/{summary.example['enrollment']}" in text
    assert "25 enrolled" in text


def test_every_patient_on_moud_has_an_active_medication_record_started_before_admission(app: Flask) -> None:
    plans = {r.enrollment_id: r.content for r in records(app, "treatment-plan")}
    on_moud = {e for e, p in plans.items() if any(i["service"] == "medication-management" for i in p["interventions"])}
    medications = by_enrollment(app, "medication")
    assert on_moud and set(medications) == on_moud
    for enrollment_id in on_moud:
        [medication] = medications[enrollment_id]
        assert (medication["category"], medication["status"]) == ("moud", "active")
        assert medication["medication"] in ("buprenorphine-naloxone", "methadone")
        admission = enrollment_of(app, enrollment_id)["admission_date"]
        assert medication["start"] < admission and "end" not in medication
    sources = {m["medication"]: m["source"] for found in medications.values() for m in found}
    assert sources["buprenorphine-naloxone"] == "prescribed-by-program"


def transition(app: Flask, discharge: StoredRecord) -> list[str]:
    return [step["event"] for step in followup.timeline(discharge, app.extensions["iop_fhir.store"])]


def test_the_aftercare_partners_answers_are_on_our_referral_tasks_as_following_them_would_copy_them(
    app: Flask,
) -> None:
    consents = by_enrollment(app, "consent")
    events: Counter[str] = Counter()
    for discharge in records(app, "discharge"):
        partner = (discharge.content.get("referral") or {}).get("partner")
        if partner is None:
            continue
        steps = transition(app, discharge)
        assert steps[0] == "created"
        if not any(c["recipient"] == partner for c in consents[discharge.enrollment_id]):
            assert steps == ["created"]  # the partner never got the referral, so it never answered
        events.update(steps[1:2] + steps[-1:])
    assert events["accepted"] > 10 and events["first-visit-attended"] > 10
    assert events["declined"] >= 1
    task = next(
        app.test_client().get(f"/fhir/{r['reference']}").get_json()
        for d in records(app, "discharge")
        for r in d.resources
        if r["role"] == "referral-task" and transition(app, d)[-1] == "first-visit-attended"
    )
    assert (task["status"], task["businessStatus"]["coding"][0]) == (
        "completed",
        {"system": followup.BSER, "code": "5.1.4", "display": "Service Request Event Completed"},
    )
    assert followup.scheduled_for(task["output"]) == task["output"][0]["valueDateTime"]


def test_the_programs_outcomes_are_plausible_some_drop_out_most_improve_a_few_relapse(
    app: Flask, seeded: tuple[Flask, demo.DemoSummary]
) -> None:
    reader = app.extensions["iop_fhir.outcomes"]
    period = program.Period(date.fromisoformat(seeded[1].first_day), date.fromisoformat(seeded[1].last_day))
    report = program.outcomes(reader.stays().stays, reader.rules, period, date.today())
    assert report["stays"] == 25 and report["discharge_reasons"]["against-advice"] >= 1
    assert report["phq9_response"]["denominator"] >= 5 and report["phq9_response"]["rate"] > 0.5
    screens = report["drug_screens"]
    assert screens["expected_positive"] > 0  # buprenorphine and methadone as prescribed
    assert screens["positive"] >= 1 and 0.7 <= screens["rate"] <= 0.9, screens
    assert 0.5 < report["aftercare_accepted"]["rate"] < 1, report["aftercare_accepted"]
    assert 0 < report["aftercare_first_visit"]["numerator"] < report["aftercare_accepted"]["numerator"]


def test_a_positive_screen_of_a_patient_on_moud_is_one_for_something_other_than_the_medication(app: Flask) -> None:
    reader = app.extensions["iop_fhir.outcomes"]
    medicated = [s for s in reader.stays().stays if s.medications]
    assert medicated
    classes: Counter[str] = Counter()
    for stay in medicated:
        for session in stay.sessions:
            if session.screen is None:
                continue
            found = classify(stay, reader.rules, session.screen.results, session.screen.day)
            positive = {a for a, r in session.screen.results if r == "positive"}
            assert (found == "expected-positive") == (bool(positive) and positive <= MOUD_ANALYTES), positive
            classes[found] += 1
    assert classes["expected-positive"] > classes["positive"]


# -- every resource is valid --------------------------------------------------------------------------------------


def test_every_fhir_resource_in_the_store_is_valid_r4(app: Flask) -> None:
    failures = []
    resources = current_resources(app)
    for res_type, res_id, resource in resources:
        issues = validate(resource, expected_type=res_type, expected_id=res_id, require_id=True)
        errors = [i for i in issues if i.severity in ("error", "fatal")]
        if errors:
            failures.append(f"{res_type}/{res_id}: {errors[0].expression}: {errors[0].diagnostics}")
    assert not failures, failures[:10]
    assert {"Patient", "EpisodeOfCare", "CarePlan", "Encounter", "Observation", "Consent", "Task"} <= {
        t for t, _, _ in resources
    }


@pytest.mark.peers
def test_every_fhir_resource_in_the_store_passes_the_independent_validator(app: Flask, tmp_path: Path) -> None:
    for res_type, res_id, resource in current_resources(app):
        (tmp_path / f"{res_type}-{res_id}.json").write_text(json.dumps(resource), encoding="utf-8")
    result = subprocess.run([str(VALIDATOR), "--quiet", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


# -- seeding again ------------------------------------------------------------------------------------------------


def audit_rows(app: Flask) -> int:
    app.extensions["iop_fhir.audit"].flush()
    total: int = app.extensions["iop_fhir.store"].audit_rows(AuditQuery(count=0, total=True))[1]
    return total


def test_seeding_again_writes_nothing_and_changes_no_count(app: Flask, seeded: tuple[Flask, demo.DemoSummary]) -> None:
    before = history_by_type(app)
    audited = audit_rows(app)
    again = demo.seed(app)
    assert again == seeded[1]  # every count; the audit trail, requests and time are not compared
    assert again.writes == 0 and again.requests > 500
    after = history_by_type(app)
    assert after == before and "AuditEvent" not in after  # the audit log is not stored as resources
    assert audit_rows(app) >= audited + again.requests  # every request is audited, a no-op too


def test_the_same_seed_draws_the_same_program_and_another_seed_another() -> None:
    def drawn(seed: int) -> list[Any]:
        stories = cohort.build(patients=6, seed=seed)
        return [(s.mrn, s.decision, s.bundle, s.enrollment, [r.payload for r in s.records]) for s in stories]

    assert drawn(7) == drawn(7)
    assert drawn(7) != drawn(8)


def test_fewer_than_one_patient_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        cohort.build(patients=0, seed=1)


# -- the command --------------------------------------------------------------------------------------------------


def test_cli_demo_migrates_seeds_and_prints_the_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IOP_FHIR_DATABASE_URL", f"sqlite:///{tmp_path / 'fresh.db'}")
    monkeypatch.setenv("IOP_FHIR_SEED_CONFORMANCE", "false")
    assert main(["demo", "--patients", "2", "--seed", "7"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("iop-fhir demo, seed 7: Clifton Intensive Outpatient Program")
    assert "  patients      2 enrolled" in out
    assert "iop-fhir token --client demo-program" in out
    assert err == ""  # no progress bar when stderr is not a terminal


def test_cli_demo_refuses_a_database_seeded_with_the_same_seed_and_other_patients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IOP_FHIR_DATABASE_URL", f"sqlite:///{tmp_path / 'fresh.db'}")
    monkeypatch.setenv("IOP_FHIR_SEED_CONFORMANCE", "false")
    assert main(["demo", "--patients", "1", "--seed", "7"]) == 0
    capsys.readouterr()
    assert main(["demo", "--patients", "2", "--seed", "7"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("iop-fhir demo: the referral of patient DEMO7-0002 on file is not the one this demo sends")


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_demo_seeds_postgresql_and_seeding_again_changes_nothing(db_url: str) -> None:
    app = create_app(Settings(database_url=db_url, base_url="http://testserver/fhir", seed_conformance=False))
    try:
        first = demo.seed(app, patients=2, seed=11)
        again = demo.seed(app, patients=2, seed=11)
    finally:
        app.extensions["iop_fhir.store"].close()
    assert first.patients == 2 and first.referrals["admitted"] == 2
    assert again == first and again.writes == 0


def test_the_demo_programs_outcomes_as_json_and_as_measure_reports_agree(
    app: Flask, seeded: tuple[Flask, demo.DemoSummary]
) -> None:
    client = app.test_client()
    first, last = seeded[1].first_day, seeded[1].last_day
    response = client.get(f"/iop/outcomes?from={first}&to={last}")
    assert response.status_code == 200
    report = response.get_json()
    assert report["stays"] == 25
    for measure, figure in FIGURES.items():
        expected: Any = report
        for part in figure.split("."):
            expected = expected[part]
        answer = client.get(f"/fhir/Measure/{measure}/$evaluate-measure?periodStart={first}&periodEnd={last}")
        assert answer.status_code == 200, (measure, answer.get_json())
        (group,) = answer.get_json()["group"]
        counts = {p["code"]["coding"][0]["code"]: p["count"] for p in group["population"]}
        assert (counts["numerator"], counts["denominator"]) == (expected["numerator"], expected["denominator"]), measure
        assert group.get("measureScore", {}).get("value") == expected["rate"], measure
        assert expected["denominator"] > 0, measure  # the demo gives every figure something to count
