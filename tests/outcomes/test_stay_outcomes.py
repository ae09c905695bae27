"""The outcomes of one stay (iop_fhir/outcomes/patient.py), on hand-built records shaped like the /iop payloads
(../shared/contract): each expected figure is worked out by hand in the test, from the definitions in
mappings/outcomes/rules.yaml. Calendar: 2026-01-05 is a Monday. The loader's part (retracted records left out) is
tested against a small in-memory RecordStore."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from iop_fhir.outcomes import load, patient, rules, stays
from iop_fhir.outcomes.stays import Stay
from iop_fhir.store.base import StoredRecord, attendees

RULES = rules.load((Path(__file__).resolve().parents[2] / "mappings" / "outcomes").resolve())

# The contract's treatment plan (treatment-plan.json): its interventions and goals.
CONTRACT_INTERVENTIONS = [
    {"service": "group-therapy", "frequency": 3, "period": 1, "period_unit": "wk", "minutes": 120},
    {"service": "individual-counseling", "frequency": 1, "period": 1, "period_unit": "wk", "minutes": 50},
    {"service": "family-therapy", "frequency": 1, "period": 2, "period_unit": "wk", "minutes": 60},
    {"service": "psychoeducation", "frequency": 1, "period": 1, "period_unit": "wk", "minutes": 60},
    {"service": "mindfulness", "frequency": 1, "period": 1, "period_unit": "wk", "minutes": 45},
    {"service": "drug-testing", "specimen": "urine", "frequency": 2, "period": 1, "period_unit": "wk"},
    {"service": "medication-management", "frequency": 1, "period": 4, "period_unit": "wk", "minutes": 20},
]
CONTRACT_GOALS: list[dict[str, Any]] = [
    {"key": "abstinence", "description": "Maintain abstinence from alcohol", "measure": "negative-drug-screens"},
    {"key": "triggers", "description": "Identify three personal triggers and a coping plan for each"},
    {"key": "attendance", "description": "Attend at least 90% of scheduled sessions", "target": 0.9},
    {"key": "mood", "description": "Reduce PHQ-9 total score below 10", "measure": "phq-9", "target": 9},
]


# -- records, shaped like the contract payloads ----------------------------------------------------------------------


def enrollment(admitted: str = "2026-01-05", program: str = "adult-sud") -> dict[str, Any]:
    return {"program": program, "level_of_care": "2.1", "admission_date": admitted}


def screen(day: str, **results: str) -> dict[str, Any]:
    """A drug screen collected on ``day``: analyte=result (underscores for hyphens)."""
    return {
        "specimen": "urine",
        "collected_at": f"{day}T18:05:00-05:00",
        "results": [{"analyte": a.replace("_", "-"), "result": r} for a, r in results.items()],
    }


def session(
    day: str,
    attendance: str = "attended",
    *,
    service: str = "group-therapy",
    start: str = "18:00",
    end: str = "21:00",
    craving: int | None = None,
    drug_screen: dict[str, Any] | None = None,
    enrollment_id: str = "E1",
) -> dict[str, Any]:
    found: dict[str, Any] = {
        "enrollment_id": enrollment_id,
        "service": service,
        "start": f"{day}T{start}:00-05:00",
        "end": f"{day}T{end}:00-05:00",
        "modality": "in-person",
        "attendance": attendance,
    }
    if craving is not None:
        found["craving_score"] = craving
    if drug_screen is not None:
        found["drug_screen"] = drug_screen
    return found


def assessment(day: str, **totals: int) -> dict[str, Any]:
    """An assessment on ``day`` with instrument totals (phq_9=12 for phq-9)."""
    return {
        "enrollment_id": "E1",
        "kind": "reassessment",
        "performed_at": f"{day}T10:30:00-05:00",
        "instruments": [{"instrument": k.replace("_", "-"), "total_score": v} for k, v in totals.items()],
    }


def plan(interventions: Iterable[Mapping[str, Any]] = (), goals: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    return {
        "enrollment_id": "E1",
        "status": "active",
        "period": {"start": "2026-01-05", "end": "2026-03-27"},
        "goals": list(goals),
        "interventions": list(interventions),
    }


def drug_testing(per_week: int) -> dict[str, Any]:
    return {"service": "drug-testing", "specimen": "urine", "frequency": per_week, "period": 1, "period_unit": "wk"}


def medication(code: str, status: str = "active", start: str = "2026-01-05", end: str | None = None) -> dict[str, Any]:
    found = {"enrollment_id": "E1", "medication": code, "status": status, "start": start, "category": "moud"}
    if end is not None:
        found["end"] = end
    return found


def discharge(day: str, reason: str = "completed", **more: Any) -> dict[str, Any]:
    return {"enrollment_id": "E1", "discharge_date": day, "reason": reason, **more}


REFERRAL = {"partner": "passaic-valley-recovery", "service": "outpatient-sud-counseling", "priority": "routine"}


def stay(admitted: str = "2026-01-05", program: str = "adult-sud", enrollment_id: str = "E1", **records: Any) -> Stay:
    found = stays.build(enrollment_id=enrollment_id, enrollment=enrollment(admitted, program), patient="P1", **records)
    assert found is not None
    return found


def outcomes(found: Stay, today: str) -> dict[str, Any]:
    return patient.outcomes(found, RULES, date.fromisoformat(today))


# -- attendance -------------------------------------------------------------------------------------------------------


def test_late_and_left_early_are_attended_and_the_rest_missed_by_reason() -> None:
    sessions = [
        session("2026-01-05", "attended"),
        session("2026-01-06", "late"),
        session("2026-01-07", "left-early"),
        session("2026-01-08", "no-show"),
        session("2026-01-09", "no-show"),
        session("2026-01-12", "excused-absence"),
        session("2026-01-13", "cancelled-by-program"),
    ]
    seen = outcomes(stay(sessions=sessions), "2026-01-20")["attendance"]
    # 7 sessions, 1 cancelled by the program: 6 scheduled; attended + late + left-early = 3; 3/6 = 0.5
    assert seen["scheduled"] == 6
    assert seen["attended"] == 3
    assert (seen["late"], seen["left_early"]) == (1, 1)
    assert seen["missed"] == {"excused-absence": 1, "no-show": 2}
    assert seen["cancelled_by_program"] == 1
    assert seen["rate"] == 0.5


def test_attendance_is_counted_by_service() -> None:
    sessions = [
        session("2026-01-05", "attended"),
        session("2026-01-07", "no-show"),
        session("2026-01-06", "late", service="individual-counseling", end="18:50"),
    ]
    by_service = outcomes(stay(sessions=sessions), "2026-01-20")["attendance"]["by_service"]
    # group-therapy: 1 attended of 2 = 0.5, one no-show; individual-counseling: 1 (late) of 1 = 1.0
    assert by_service["group-therapy"]["scheduled"] == 2
    assert by_service["group-therapy"]["attended"] == 1
    assert by_service["group-therapy"]["missed"] == {"no-show": 1}
    assert by_service["group-therapy"]["rate"] == 0.5
    assert by_service["individual-counseling"]["attended"] == 1
    assert by_service["individual-counseling"]["rate"] == 1.0


def test_a_stay_admitted_today_has_no_sessions_and_no_week_judged() -> None:
    found = outcomes(stay("2026-01-07"), "2026-01-07")
    # admitted Wednesday 7 January, today: 0 days, one week (Wed-Wed so far) not over
    assert found["ongoing"] is True
    assert found["length_of_stay_days"] == 0
    assert found["attendance"]["scheduled"] == 0
    assert found["attendance"]["rate"] is None
    assert [(w["days"], w["complete"], w["meets_minimum"]) for w in found["hours"]["weeks"]] == [(1, False, None)]
    assert found["hours"]["weeks_judged"] == 0
    assert found["hours"]["median_per_week"] is None
    assert found["drug_screens"]["screens"] == 0
    assert found["drug_screens"]["negative_rate"] is None
    assert found["instruments"] == {}
    assert found["craving"] is None
    assert found["discharge_reason"] is None


def test_a_stay_admitted_yesterday_is_one_day_long_with_its_week_in_progress() -> None:
    found = outcomes(stay("2026-01-07"), "2026-01-08")
    # Wednesday to Thursday: 1 day; the week (Mon 5 - Sun 11 January) is not over on Thursday
    assert found["length_of_stay_days"] == 1
    assert found["hours"]["weeks"][0]["days"] == 2
    assert found["hours"]["weeks"][0]["complete"] is False
    assert found["hours"]["weeks_below_minimum"] == []


def test_summary_of_a_stay_without_sessions() -> None:
    found = outcomes(stay("2026-01-07"), "2026-01-07")
    assert patient.summary(found) == "0 days in the program: no sessions scheduled."


# -- group sessions ---------------------------------------------------------------------------------------------------


GROUP = {
    "group_id": "G-2026-01-12-EVE-CBT",
    "service": "group-therapy",
    "approach": "cbt",
    "start": "2026-01-12T18:00:00-05:00",
    "end": "2026-01-12T21:00:00-05:00",
    "modality": "in-person",
    "attendees": [
        {
            "enrollment_id": "E1",
            "attendance": "attended",
            "craving_score": 3,
            "drug_screen": screen("2026-01-12", fentanyl="negative", cocaine="negative"),
        },
        {"enrollment_id": "E2", "attendance": "late", "craving_score": 6},
        {"enrollment_id": "E3", "attendance": "no-show"},
    ],
}


def test_a_group_attendee_has_the_groups_service_day_and_hours() -> None:
    found = outcomes(stay(group_sessions=[GROUP]), "2026-01-20")
    # E1 attended the 3-hour group on Monday 12 January (week 2): 1 of 1, 3 hours that week, its screen negative
    assert found["attendance"]["scheduled"] == 1
    assert found["attendance"]["by_service"]["group-therapy"]["attended"] == 1
    assert [w["delivered"] for w in found["hours"]["weeks"]] == [0.0, 3.0, 0.0]
    assert found["drug_screens"]["negative"] == 1
    assert found["craving"]["first"] == {"date": "2026-01-12", "score": 3}


def test_a_group_no_show_is_missed() -> None:
    seen = outcomes(stay(enrollment_id="E3", group_sessions=[GROUP]), "2026-01-20")["attendance"]
    # E3 is listed as a no-show: scheduled 1, attended 0, missed by reason no-show
    assert (seen["scheduled"], seen["attended"]) == (1, 0)
    assert seen["missed"] == {"no-show": 1}


def test_another_enrollments_attendance_at_a_group_is_not_counted() -> None:
    found = outcomes(stay(enrollment_id="E4", group_sessions=[GROUP]), "2026-01-20")
    # E4 is not among the attendees: nothing scheduled, no hours
    assert found["attendance"]["scheduled"] == 0
    assert sum(w["delivered"] for w in found["hours"]["weeks"]) == 0


# -- treatment hours -------------------------------------------------------------------------------------------------


def test_planned_hours_of_the_contract_plan() -> None:
    found = outcomes(stay(plan=plan(CONTRACT_INTERVENTIONS)), "2026-01-20")
    # group 3 x 120 = 360 min, individual 50, family 60 every 2 weeks = 30, psychoeducation 60, mindfulness 45,
    # medication management 20 every 4 weeks = 5, drug testing not treatment: 550 min = 9.1667 h -> 9.17
    assert found["hours"]["planned_per_week"] == 9.17
    assert found["hours"]["weeks"][0]["planned"] == 9.17


def test_planned_hours_are_the_plans_stored_weekly_treatment_hours() -> None:
    stored = {**plan(CONTRACT_INTERVENTIONS), "weekly_treatment_hours": 10.5}
    found = outcomes(stay("2026-01-08", plan=stored), "2026-01-13")["hours"]
    # the mapping's figure wins over the interventions (9.17); week 1 has 4 days: 10.5 x 4/7 = 6.0
    assert found["planned_per_week"] == 10.5
    assert found["weeks"][0]["planned"] == 6.0


@pytest.mark.parametrize(
    ("program", "minimum"), [("adult-sud", 9.0), ("adult-co-occurring", 9.0), ("adolescent-sud", 6.0)]
)
def test_the_asam_minimum_of_each_program(program: str, minimum: float) -> None:
    assert outcomes(stay(program=program), "2026-01-13")["hours"]["minimum_per_week"] == minimum


def test_delivered_hours_per_week_against_the_minimum() -> None:
    sessions = [
        # week 1 (5-11 January): three 3-hour groups attended, late, left early = 9 h; a no-show adds nothing
        session("2026-01-05", "attended"),
        session("2026-01-07", "late"),
        session("2026-01-09", "left-early"),
        session("2026-01-10", "no-show"),
        # week 2 (12-18 January): two groups = 6 h; a 15-minute drug test is not treatment
        session("2026-01-12"),
        session("2026-01-14"),
        session("2026-01-15", service="drug-testing", end="18:15"),
        # week 3 (19-25 January): in progress on Wednesday 21 January
        session("2026-01-19"),
    ]
    found = outcomes(stay(sessions=sessions), "2026-01-21")["hours"]
    assert found["minimum_per_week"] == 9.0
    assert [w["delivered"] for w in found["weeks"]] == [9.0, 6.0, 3.0]
    # 9 >= 9 meets, 6 < 9 does not, week 3 not judged
    assert [w["meets_minimum"] for w in found["weeks"]] == [True, False, None]
    assert found["weeks_judged"] == 2
    assert found["weeks_meeting_minimum"] == 1
    assert found["weeks_below_minimum"] == [2]
    # median of the judged weeks (9, 6) = 7.5
    assert found["median_per_week"] == 7.5


def test_a_week_still_in_progress_is_not_judged() -> None:
    found = outcomes(stay(sessions=[session("2026-01-05")]), "2026-01-11")["hours"]
    # Sunday 11 January is the last day of week 1 and not over yet: 3 h < 9 is not held against it
    assert found["weeks"][0]["complete"] is False
    assert found["weeks"][0]["meets_minimum"] is None
    assert found["weeks_below_minimum"] == []


def test_a_session_counts_in_the_week_of_its_local_date() -> None:
    # Sunday 11 January 21:00-23:00 at -05:00 is Monday 12 January in UTC; it belongs to week 1, not week 2
    late_sunday = session("2026-01-11", start="21:00", end="23:00")
    found = outcomes(stay(sessions=[late_sunday]), "2026-01-14")["hours"]
    assert [w["delivered"] for w in found["weeks"]] == [2.0, 0.0]


def test_a_week_spanning_admission_has_the_minimum_in_proportion() -> None:
    # admitted Thursday 8 January: week 1 is Thursday to Sunday, 4 days; minimum 9 x 4/7 = 5.142857 -> 5.14;
    # planned 9.17 x 4/7 = 5.24; two 3-hour groups = 6 h >= 5.14
    sessions = [session("2026-01-08"), session("2026-01-10")]
    found = outcomes(stay("2026-01-08", sessions=sessions, plan=plan(CONTRACT_INTERVENTIONS)), "2026-01-13")["hours"]
    week = found["weeks"][0]
    assert (week["start"], week["days"], week["complete"]) == ("2026-01-05", 4, True)
    assert week["minimum"] == 5.14
    assert week["planned"] == 5.24
    assert week["delivered"] == 6.0
    assert week["meets_minimum"] is True


def test_a_week_spanning_admission_below_its_prorated_minimum() -> None:
    # admitted Thursday 8 January: 4 days, minimum 5.14; two 2.5-hour groups = 5 h < 5.14
    sessions = [session("2026-01-08", end="20:30"), session("2026-01-10", end="20:30")]
    found = outcomes(stay("2026-01-08", sessions=sessions), "2026-01-13")["hours"]
    assert found["weeks"][0]["delivered"] == 5.0
    assert found["weeks"][0]["meets_minimum"] is False
    assert found["weeks_below_minimum"] == [1]


def test_an_adolescent_program_has_a_6_hour_minimum() -> None:
    sessions = [session("2026-01-05"), session("2026-01-07")]
    adolescent = outcomes(stay(program="adolescent-sud", sessions=sessions), "2026-01-12")["hours"]
    adult = outcomes(stay(program="adult-sud", sessions=sessions), "2026-01-12")["hours"]
    # 2 x 3 h = 6 h: meets the adolescent 6 h, not the adult 9 h
    assert adolescent["minimum_per_week"] == 6.0
    assert adolescent["weeks"][0]["meets_minimum"] is True
    assert adult["minimum_per_week"] == 9.0
    assert adult["weeks"][0]["meets_minimum"] is False


def test_an_adolescent_week_spanning_admission_has_6_hours_in_proportion() -> None:
    # admitted Thursday 8 January: 6 x 4/7 = 3.428571 -> 3.43; one 3-hour group < 3.43
    found = outcomes(stay("2026-01-08", "adolescent-sud", sessions=[session("2026-01-08")]), "2026-01-13")["hours"]
    assert found["weeks"][0]["minimum"] == 3.43
    assert found["weeks"][0]["meets_minimum"] is False


def test_a_discharge_mid_week_has_the_minimum_in_proportion() -> None:
    sessions = [session(d) for d in ("2026-01-05", "2026-01-07", "2026-01-09", "2026-01-12", "2026-01-14")]
    found = outcomes(stay(sessions=sessions, discharge=discharge("2026-01-14")), "2026-02-01")["hours"]
    # discharged Wednesday 14 January: 2 weeks; week 2 is Monday to Wednesday, 3 days, 9 x 3/7 = 3.857 -> 3.86,
    # judged (the stay's part of it is over); 2 x 3 h = 6 >= 3.86
    assert [(w["days"], w["complete"]) for w in found["weeks"]] == [(7, True), (3, True)]
    assert found["weeks"][1]["minimum"] == 3.86
    assert found["weeks"][1]["delivered"] == 6.0
    assert found["weeks_meeting_minimum"] == 2


# -- drug screens -----------------------------------------------------------------------------------------------------


def test_screens_are_classified_by_week() -> None:
    sessions = [
        session("2026-01-05", drug_screen=screen("2026-01-05", cocaine="negative", ethanol="negative")),
        session("2026-01-07", drug_screen=screen("2026-01-07", cannabinoids="positive", opiates="negative")),
        session("2026-01-12", drug_screen=screen("2026-01-12", fentanyl="negative", cocaine="invalid")),
    ]
    found = outcomes(stay(sessions=sessions), "2026-01-19")["drug_screens"]
    # weeks 1 and 2 (today Monday 19 January opens week 3, no screen yet)
    assert [w["screens"] for w in found["weeks"]] == [2, 1, 0]
    # week 1: one negative, one positive (cannabinoids); week 2: invalid and nothing positive = inconclusive
    assert [(w["negative"], w["positive"], w["inconclusive"]) for w in found["weeks"][:2]] == [(1, 1, 0), (0, 0, 1)]
    assert (found["screens"], found["negative"], found["positive"], found["inconclusive"]) == (3, 1, 1, 1)
    # negative rate: 1 negative of 3 screens = 0.3333
    assert found["negative_rate"] == 0.3333


def test_buprenorphine_is_expected_positive_while_buprenorphine_naloxone_is_taken() -> None:
    sessions = [session("2026-01-07", drug_screen=screen("2026-01-07", buprenorphine="positive", fentanyl="negative"))]
    found = outcomes(stay(sessions=sessions, medications=[medication("buprenorphine-naloxone")]), "2026-01-20")
    screens = found["drug_screens"]
    # active since 5 January: buprenorphine is explained; expected-positive counts with the negatives, 1 of 1
    assert (screens["expected_positive"], screens["positive"], screens["negative"]) == (1, 0, 0)
    assert screens["negative_rate"] == 1.0


def test_buprenorphine_is_positive_after_the_medication_ended() -> None:
    sessions = [
        session("2026-01-07", drug_screen=screen("2026-01-07", buprenorphine="positive")),
        session("2026-01-14", drug_screen=screen("2026-01-14", buprenorphine="positive")),
    ]
    ended = medication("buprenorphine-naloxone", status="stopped", start="2026-01-05", end="2026-01-10")
    screens = outcomes(stay(sessions=sessions, medications=[ended]), "2026-01-18")["drug_screens"]
    # taken 5-10 January: the screen of the 7th is expected-positive, that of the 14th positive
    assert [(w["expected_positive"], w["positive"]) for w in screens["weeks"]] == [(1, 0), (0, 1)]


def test_buprenorphine_is_positive_before_the_medication_started() -> None:
    sessions = [session("2026-01-07", drug_screen=screen("2026-01-07", buprenorphine="positive"))]
    later = medication("buprenorphine-naloxone", start="2026-01-09")
    screens = outcomes(stay(sessions=sessions, medications=[later]), "2026-01-20")["drug_screens"]
    # the screen of the 7th precedes the start on the 9th: nothing explains it
    assert (screens["positive"], screens["expected_positive"]) == (1, 0)


def test_an_unexplained_analyte_beside_an_expected_one_is_positive() -> None:
    sessions = [session("2026-01-07", drug_screen=screen("2026-01-07", buprenorphine="positive", fentanyl="positive"))]
    screens = outcomes(stay(sessions=sessions, medications=[medication("buprenorphine-naloxone")]), "2026-01-20")
    # fentanyl is not explained by buprenorphine-naloxone
    assert screens["drug_screens"]["positive"] == 1
    assert screens["drug_screens"]["expected_positive"] == 0


def test_missed_screens_come_from_the_plans_drug_testing_frequency() -> None:
    sessions = [
        session("2026-01-05", drug_screen=screen("2026-01-05", ethanol="negative")),
        session("2026-01-12", drug_screen=screen("2026-01-12", ethanol="negative")),
        session("2026-01-15", drug_screen=screen("2026-01-15", ethanol="negative")),
    ]
    found = outcomes(stay(sessions=sessions, plan=plan([drug_testing(2)])), "2026-01-28")["drug_screens"]
    # 2 a week; today Wednesday 28 January: week 1 one screen (1 missed), week 2 two (0), week 3 none (2),
    # week 4 in progress (not counted): 3 missed
    assert [w["missed"] for w in found["weeks"]] == [1, 0, 2, 0]
    assert found["missed"] == 3


def test_missed_screens_in_a_week_spanning_admission_are_in_proportion() -> None:
    found = outcomes(stay("2026-01-08", plan=plan([drug_testing(2)])), "2026-01-13")["drug_screens"]
    # admitted Thursday 8 January: 2 x 4/7 = 1.14 screens owed, whole screens: 1 missed
    assert found["weeks"][0]["missed"] == 1


def test_without_drug_testing_in_the_plan_missed_screens_are_drug_testing_sessions_missed() -> None:
    sessions = [
        session("2026-01-06", "no-show", service="drug-testing", end="18:15"),
        session("2026-01-08", "cancelled-by-program", service="drug-testing", end="18:15"),
        session(
            "2026-01-09", service="drug-testing", end="18:15", drug_screen=screen("2026-01-09", ethanol="negative")
        ),
    ]
    found = outcomes(stay(sessions=sessions), "2026-01-20")["drug_screens"]
    # one no-show drug test is missed; cancelled by the program was never owed; the attended one was screened
    assert found["missed"] == 1
    assert found["screens"] == 1


# -- symptom scales --------------------------------------------------------------------------------------------------


def scales(*assessments: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = outcomes(stay(assessments=list(assessments)), "2026-03-01")["instruments"]
    return found


def test_phq9_response_at_exactly_half_counts() -> None:
    phq = scales(assessment("2026-01-05", phq_9=12), assessment("2026-02-02", phq_9=6))["phq-9"]
    # 12 -> 6: change -6, (12 - 6) / 12 = 0.5 >= 0.5 is a response; 6 is not below 5
    assert phq["first"] == {"date": "2026-01-05", "score": 12}
    assert phq["latest"] == {"date": "2026-02-02", "score": 6}
    assert phq["change"] == -6
    assert phq["percent_change"] == -50.0
    assert phq["response"] is True
    assert phq["remission"] is False


def test_phq9_below_half_is_no_response() -> None:
    phq = scales(assessment("2026-01-05", phq_9=13), assessment("2026-02-02", phq_9=7))["phq-9"]
    # (13 - 7) / 13 = 0.46 < 0.5
    assert phq["response"] is False


@pytest.mark.parametrize(("latest", "remission"), [(4, True), (5, False)])
def test_phq9_remission_is_a_latest_score_below_5(latest: int, remission: bool) -> None:
    phq = scales(assessment("2026-01-05", phq_9=14), assessment("2026-02-02", phq_9=latest))["phq-9"]
    # 14 -> 4 or 5: both responses ((14 - 5) / 14 = 0.64); remission only below 5
    assert phq["response"] is True
    assert phq["remission"] is remission


def test_phq9_is_first_to_latest_whatever_the_order_of_the_records() -> None:
    phq = scales(
        assessment("2026-02-16", phq_9=11),
        assessment("2026-01-05", phq_9=20),
        assessment("2026-01-19", phq_9=8),
    )["phq-9"]
    # by date: 20 (5 Jan), 8, 11 (16 Feb); first 20, latest 11: change -9, 9/20 = 0.45 no response
    assert (phq["first"]["score"], phq["latest"]["score"], phq["count"]) == (20, 11, 3)
    assert phq["change"] == -9
    assert phq["response"] is False


@pytest.mark.parametrize(("latest", "response", "remission"), [(4, True, True), (6, False, False)])
def test_gad7_response_and_remission(latest: int, response: bool, remission: bool) -> None:
    gad = scales(assessment("2026-01-05", gad_7=10), assessment("2026-02-02", gad_7=latest))["gad-7"]
    # 10 -> 4: 60% reduction, below 5; 10 -> 6: 40%, not below 5
    assert gad["response"] is response
    assert gad["remission"] is remission


def test_audit_c_has_a_response_but_no_remission_definition() -> None:
    audit = scales(assessment("2026-01-05", audit_c=8), assessment("2026-02-02", audit_c=2))["audit-c"]
    # 8 -> 2: 75% reduction is a response; rules.yaml defines no remission for AUDIT-C
    assert audit["change"] == -6
    assert audit["response"] is True
    assert audit["remission"] is None


def test_a_single_score_has_no_change_response_or_remission() -> None:
    phq = scales(assessment("2026-01-05", phq_9=3))["phq-9"]
    # one score: nothing to compare, even though 3 is below 5
    assert phq["count"] == 1
    assert phq["first"] == phq["latest"] == {"date": "2026-01-05", "score": 3}
    assert (phq["change"], phq["percent_change"], phq["response"], phq["remission"]) == (None, None, None, None)


def test_a_total_not_given_is_the_sum_of_its_items() -> None:
    items = {"instrument": "phq-9", "items": [2, 2, 1, 2, 1, 2, 1, 1, 0]}
    first = {
        "enrollment_id": "E1",
        "kind": "intake",
        "performed_at": "2026-01-05T10:30:00-05:00",
        "instruments": [items],
    }
    phq = scales(first, assessment("2026-02-02", phq_9=6))["phq-9"]
    # 2+2+1+2+1+2+1+1+0 = 12
    assert phq["first"]["score"] == 12


# -- craving ---------------------------------------------------------------------------------------------------------


def craving(*points: tuple[str, int, str]) -> dict[str, Any]:
    sessions = [session(day, attendance, craving=score) for day, score, attendance in points]
    found: dict[str, Any] = outcomes(stay(sessions=sessions), "2026-03-01")["craving"]
    return found


def test_craving_falling() -> None:
    found = craving(("2026-01-05", 8, "attended"), ("2026-01-12", 6, "attended"), ("2026-01-19", 4, "late"))
    # weeks 0, 1, 2 and scores 8, 6, 4: slope -2 points a week
    assert found["slope_per_week"] == -2.0
    assert found["trend"] == "falling"
    assert (found["first"]["score"], found["latest"]["score"], found["change"]) == (8, 4, -4)


def test_craving_rising() -> None:
    found = craving(("2026-01-05", 2, "attended"), ("2026-01-19", 6, "attended"))
    # weeks 0 and 2, scores 2 and 6: slope +2 a week
    assert found["slope_per_week"] == 2.0
    assert found["trend"] == "rising"


def test_craving_within_a_tenth_of_a_point_a_week_is_flat() -> None:
    found = craving(("2026-01-05", 5, "attended"), ("2026-03-16", 6, "attended"))
    # 70 days = 10 weeks apart, +1 point: slope 0.1 a week, not beyond 0.1
    assert found["slope_per_week"] == 0.1
    assert found["trend"] == "flat"


def test_craving_of_a_missed_session_is_left_out() -> None:
    found = craving(("2026-01-05", 5, "attended"), ("2026-01-12", 9, "no-show"), ("2026-01-19", 5, "attended"))
    # the no-show's 9 is not a report: 5, 5 is flat (slope 0)
    assert [p["score"] for p in found["points"]] == [5, 5]
    assert found["trend"] == "flat"


def test_a_single_craving_score_has_no_trend() -> None:
    found = craving(("2026-01-05", 5, "attended"))
    assert found["slope_per_week"] is None
    assert found["trend"] is None


# -- goals, length of stay, discharge --------------------------------------------------------------------------------


def test_goals_achieved_come_from_the_discharges_goal_outcomes() -> None:
    ended = discharge(
        "2026-03-27",
        goal_outcomes=[
            {"goal": "abstinence", "status": "achieved"},
            {"goal": "triggers", "status": "sustaining"},
            {"goal": "attendance", "status": "not-achieved"},
            {"goal": "mood", "status": "improving"},
        ],
    )
    found = outcomes(stay(plan=plan(goals=CONTRACT_GOALS), discharge=ended), "2026-04-01")["goals"]
    # achieved and sustaining count: 2 of 4
    assert [(g["key"], g["achieved"]) for g in found["goals"]] == [
        ("abstinence", True),
        ("triggers", True),
        ("attendance", False),
        ("mood", False),
    ]
    assert (found["achieved"], found["total"]) == (2, 4)


def test_goals_of_an_ongoing_stay_have_no_outcome_yet() -> None:
    found = outcomes(stay(plan=plan(goals=CONTRACT_GOALS)), "2026-02-01")["goals"]
    assert [g["status"] for g in found["goals"]] == [None, None, None, None]
    assert [g["achieved"] for g in found["goals"]] == [None, None, None, None]
    assert (found["achieved"], found["total"]) == (0, 4)


def test_length_of_stay_and_discharge_reason() -> None:
    found = outcomes(stay(discharge=discharge("2026-03-27", "completed")), "2026-04-15")
    # 5 January to 27 March: 26 (to 31 Jan) + 28 (Feb) + 27 = 81 days
    assert found["length_of_stay_days"] == 81
    assert found["discharge_date"] == "2026-03-27"
    assert found["discharge_reason"] == "completed"
    assert found["ongoing"] is False


def test_length_of_an_ongoing_stay_runs_to_today() -> None:
    found = outcomes(stay(), "2026-02-04")
    # 5 January to 4 February: 30 days
    assert found["length_of_stay_days"] == 30
    assert found["discharge_reason"] is None


# -- aftercare -------------------------------------------------------------------------------------------------------


def steps(first_visit: str | None, *, scheduled: str | None = None, accepted: bool = True) -> list[dict[str, Any]]:
    """Transition steps as exchange/followup.py timeline() gives them, oldest first."""
    found: list[dict[str, Any]] = [
        {"at": "2026-03-27T20:00:00Z", "event": "created", "status": "requested"},
        {"at": "2026-03-27T20:01:00Z", "event": "sent", "status": "requested"},
    ]
    if accepted:
        found.append({"at": "2026-03-30T14:00:00Z", "event": "accepted", "status": "accepted"})
    if scheduled:
        found.append(
            {"at": "2026-03-31T14:00:00Z", "event": "scheduled", "status": "in-progress", "scheduled_for": scheduled}
        )
    if first_visit:
        found.append({"at": first_visit, "event": "first-visit-attended", "status": "in-progress"})
    return found


def aftercare(
    transition: list[dict[str, Any]], referral: Mapping[str, Any] | None = REFERRAL, today: str = "2026-05-01"
) -> dict[str, Any]:
    ended = discharge("2026-03-27", referral=referral) if referral else discharge("2026-03-27")
    found: dict[str, Any] = outcomes(stay(discharge=ended, transition=transition), today)["aftercare"]
    return found


def test_aftercare_accepted_and_first_visit_on_day_14_is_linked() -> None:
    found = aftercare(steps("2026-04-10T19:00:00Z", scheduled="2026-04-10"))
    # discharged 27 March; first visit 10 April = 14 days later, within 14
    assert found["referred"] is True
    assert found["partner"] == "passaic-valley-recovery"
    assert found["accepted"] is True
    assert found["accepted_at"] == "2026-03-30T14:00:00Z"
    assert found["first_visit"] == "2026-04-10"
    assert found["first_visit_in_window"] is True
    assert found["status"] == "first-visit-attended"


def test_aftercare_first_visit_on_day_15_is_outside_the_window() -> None:
    found = aftercare(steps("2026-04-11T19:00:00Z", scheduled="2026-04-11"))
    # 27 March + 15 days = 11 April
    assert found["accepted"] is True
    assert found["first_visit"] == "2026-04-11"
    assert found["first_visit_in_window"] is False


def test_aftercare_first_visit_is_the_scheduled_date_not_the_day_it_was_reported() -> None:
    found = aftercare(steps("2026-04-20T19:00:00Z", scheduled="2026-04-09"))
    # scheduled for 9 April (13 days), reported on 20 April: the visit was on the 9th
    assert found["first_visit"] == "2026-04-09"
    assert found["first_visit_in_window"] is True


def test_aftercare_sent_but_not_accepted() -> None:
    found = aftercare(steps(None, accepted=False))
    assert found["accepted"] is False
    assert found["first_visit"] is None
    assert found["first_visit_in_window"] is False
    assert found["status"] == "sent"


def test_aftercare_without_a_visit_while_the_window_is_open_is_undecided() -> None:
    # discharged 27 March, window closes 10 April: on 5 April an accepted referral without a visit is not yet late
    assert aftercare(steps(None, accepted=True), today="2026-04-05")["first_visit_in_window"] is None
    # on 11 April the window has closed without a visit
    assert aftercare(steps(None, accepted=True), today="2026-04-11")["first_visit_in_window"] is False


def test_a_discharge_without_referral_has_no_aftercare() -> None:
    found = aftercare([], referral=None)
    assert found["referred"] is False
    assert found["accepted"] is False
    assert found["first_visit_in_window"] is None


# -- the summary -----------------------------------------------------------------------------------------------------


def test_summary_of_a_simple_stay() -> None:
    sessions = [
        session("2026-01-05"),
        session("2026-01-07"),
        session("2026-01-09"),
        session("2026-01-12", "no-show"),
        session("2026-01-14", drug_screen=screen("2026-01-14", ethanol="negative")),
    ]
    found = outcomes(
        stay(
            sessions=sessions,
            assessments=[assessment("2026-01-05", phq_9=14), assessment("2026-01-14", phq_9=6)],
            discharge=discharge("2026-01-16"),
        ),
        "2026-02-01",
    )
    # 5 to 16 January: 11 days; 4 of 5 sessions attended = 80%; week 1 9 h >= 9 meets, week 2 (Mon-Fri, 5 days)
    # 3 h < 9 x 5/7 = 6.43 does not: 1 of 2; 1 of 1 screen negative; PHQ-9 14 to 6
    assert patient.summary(found) == (
        "11 days in the program: attended 4 of 5 scheduled sessions (80%); 1 of 2 weeks met the ASAM 2.1 minimum "
        "of 9 hours; 1 of 1 drug screens negative; PHQ-9 14 to 6."
    )


# -- the loader: retracted records ------------------------------------------------------------------------------------


def record(kind: str, id: str, content: dict[str, Any], status: str = "active", created: int = 1) -> StoredRecord:
    resources = [{"role": "patient", "reference": "Patient/P1"}] if kind == "enrollment" else []
    return StoredRecord(
        kind=kind,
        id=id,
        enrollment_id=content.get("enrollment_id") if kind != "enrollment" else id,
        status=status,
        version=1,
        content=content,
        resources=resources,
        created=created,
        updated=created,
    )


class Records:
    """A RecordStore of the records given."""

    def __init__(self, records: list[StoredRecord]) -> None:
        self.held = records

    def record(self, kind: str, id: str) -> StoredRecord | None:
        return next((r for r in self.held if r.kind == kind and r.id == id), None)

    def records(
        self, kind: str, *, enrollment_id: str | None = None, offset: int = 0, count: int = 20
    ) -> tuple[list[StoredRecord], int]:
        found = [r for r in self.held if r.kind == kind and (enrollment_id is None or r.enrollment_id == enrollment_id)]
        return found[offset : offset + count], len(found)

    def enrollments_during(self, start: date, end: date) -> list[StoredRecord]:
        return [r for r in self.held if r.kind == "enrollment" and r.status == "active"]  # more is allowed

    def records_of(self, kinds: Iterable[str], enrollment_ids: Iterable[str]) -> list[StoredRecord]:
        wanted, ids = set(kinds), set(enrollment_ids)
        return [r for r in self.held if r.kind in wanted and r.enrollment_id in ids]

    def group_sessions_of(self, enrollment_ids: Iterable[str]) -> list[StoredRecord]:
        ids = set(enrollment_ids)
        return [r for r in self.held if r.kind == "group-session" and set(attendees(r.kind, r.content)) & ids]


def held() -> Records:
    group = {**GROUP, "attendees": [{"enrollment_id": "E1", "attendance": "attended"}]}
    retracted_group = {**GROUP, "start": "2026-01-13T18:00:00-05:00", "end": "2026-01-13T21:00:00-05:00"}
    return Records(
        [
            record("enrollment", "E1", enrollment()),
            record("enrollment", "E9", enrollment("2026-01-06"), status="entered-in-error"),
            record("session", "S1", session("2026-01-05")),
            record("session", "S2", session("2026-01-07", "no-show"), status="entered-in-error"),
            record("group-session", "G1", group),
            record("group-session", "G2", retracted_group, status="entered-in-error"),
            record("assessment", "A1", assessment("2026-01-05", phq_9=12)),
            record("assessment", "A2", assessment("2026-01-19", phq_9=2), status="entered-in-error"),
            record("treatment-plan", "T1", plan([drug_testing(2)])),
            record("treatment-plan", "T2", {**plan(), "period": {"start": "2026-02-01"}}, status="entered-in-error"),
            record("discharge", "D1", discharge("2026-01-23", referral=REFERRAL)),
            record("discharge", "D2", discharge("2026-01-16", "against-advice"), status="entered-in-error", created=2),
        ]
    )


def transitions_of(discharges: list[StoredRecord]) -> dict[str, list[dict[str, Any]]]:
    assert [d.id for d in discharges] == ["D1"]
    return {"D1": steps(None)}


def test_the_loader_leaves_out_retracted_records() -> None:
    loaded = load.load(held(), timelines=transitions_of)
    # E9 is retracted: one stay; S2 (a no-show), G2, A2, T2 (a later plan) and D2 (a later discharge) retracted:
    # 1 session + 1 group, PHQ-9 12 only, plan T1, discharged 23 January
    assert [s.enrollment_id for s in loaded.stays] == ["E1"]
    found = loaded.stays[0]
    assert found.patient == "P1"
    assert [(s.day.isoformat(), s.attendance, s.group_id) for s in found.sessions] == [
        ("2026-01-05", "attended", None),
        ("2026-01-12", "attended", "G1"),
    ]
    assert [s.score for s in found.scores["phq-9"]] == [12]
    assert found.plan is not None and found.plan["interventions"] == [drug_testing(2)]
    assert (found.discharge, found.reason) == (date(2026, 1, 23), "completed")
    assert [step["event"] for step in found.transition] == ["created", "sent", "accepted"]
    seen = outcomes(found, "2026-02-01")["attendance"]
    # the retracted no-show is not a missed session: 2 of 2
    assert (seen["scheduled"], seen["attended"], seen["missed"]) == (2, 2, {})


def test_the_loader_finds_no_stay_for_a_retracted_enrollment() -> None:
    assert load.load(held(), timelines=transitions_of, enrollment_id="E9").stays == []
