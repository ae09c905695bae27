"""A program's outcomes over a period (iop_fhir/outcomes/program.py), on hand-built stays whose figures are worked
out by hand in each test from the definitions in mappings/outcomes/rules.yaml. Calendar: 2026-01-05 is a Monday."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

from iop_fhir.outcomes import program, rules, stays
from iop_fhir.outcomes.program import Period
from iop_fhir.outcomes.stays import Stay

RULES = rules.load((Path(__file__).resolve().parents[2] / "mappings" / "outcomes").resolve())
REFERRAL = {"partner": "passaic-valley-recovery", "service": "outpatient-sud-counseling", "priority": "routine"}


def session(day: str, attendance: str = "attended", *, hours: int = 3, **more: Any) -> dict[str, Any]:
    return {
        "service": "group-therapy",
        "start": f"{day}T12:00:00-05:00",
        "end": f"{day}T{12 + hours}:00:00-05:00",
        "attendance": attendance,
        **more,
    }


def screened(day: str, **results: str) -> dict[str, Any]:
    """An attended session with a drug screen: analyte=result."""
    drug_screen = {
        "specimen": "urine",
        "collected_at": f"{day}T12:05:00-05:00",
        "results": [{"analyte": a, "result": r} for a, r in results.items()],
    }
    return session(day, drug_screen=drug_screen)


def phq9(*scores: tuple[str, int]) -> list[dict[str, Any]]:
    return [
        {"kind": "reassessment", "performed_at": day, "instruments": [{"instrument": "phq-9", "total_score": score}]}
        for day, score in scores
    ]


def stay(
    enrollment_id: str,
    admitted: str,
    discharged: str | None = None,
    reason: str = "completed",
    *,
    program_: str = "adult-sud",
    patient: str | None = None,
    referral: dict[str, Any] | None = None,
    **records: Any,
) -> Stay:
    ended: dict[str, Any] | None = None
    if discharged is not None:
        ended = {"discharge_date": discharged, "reason": reason}
        if referral is not None:
            ended["referral"] = referral
    found = stays.build(
        enrollment_id=enrollment_id,
        enrollment={"program": program_, "admission_date": admitted},
        patient=patient or f"P-{enrollment_id}",
        discharge=ended,
        **records,
    )
    assert found is not None
    return found


def report(found: list[Stay], start: str, end: str, today: str, program_: str | None = None) -> dict[str, Any]:
    period = Period(date.fromisoformat(start), date.fromisoformat(end))
    return program.outcomes(found, RULES, period, date.fromisoformat(today), program_)


def weekly(found: dict[str, Any], key: str) -> list[Any]:
    return [w[key] for w in found["weeks"]]


# -- census, admissions, discharges ----------------------------------------------------------------------------------


def census_stays() -> list[Stay]:
    return [
        stay("X", "2026-01-05", "2026-01-14", "against-advice"),  # Mon 5 - Wed 14 January
        stay("Y", "2026-01-15"),  # Thursday 15 January, ongoing
        stay("Z", "2025-12-29"),  # admitted before the period, ongoing
        stay("OLD", "2025-11-03", "2025-12-31"),  # discharged before the period: not counted
    ]


def test_census_admissions_and_discharges_by_calendar_week() -> None:
    found = report(census_stays(), "2026-01-05", "2026-01-25", "2026-02-10")
    assert weekly(found, "week") == ["2026-01-05", "2026-01-12", "2026-01-19"]
    # week of 5 Jan: X, Z; week of 12 Jan: X (to Wed), Y (from Thu), Z; week of 19 Jan: Y, Z
    assert weekly(found, "census") == [2, 3, 2]
    assert weekly(found, "admissions") == [1, 1, 0]
    assert weekly(found, "discharges") == [0, 1, 0]
    # enrolled in the period: X, Y, Z (not OLD); admitted in it: X, Y; discharged in it: X
    assert (found["stays"], found["admissions"], found["discharges"]) == (3, 2, 1)
    assert found["discharge_reasons"] == {"against-advice": 1}


def test_a_readmission_is_two_stays() -> None:
    first = stay(
        "E1",
        "2026-01-05",
        "2026-01-23",
        "against-advice",
        patient="P1",
        sessions=[session("2026-01-05"), session("2026-01-07"), session("2026-01-09", "no-show")],
    )
    second = stay("E2", "2026-02-02", patient="P1", sessions=[session("2026-02-02")])
    found = report([first, second], "2026-01-01", "2026-02-28", "2026-03-15")
    # the same patient admitted twice: 2 stays, 2 admissions, 1 discharge
    assert (found["stays"], found["admissions"], found["discharges"]) == (2, 2, 1)
    # sessions of both stays: 3 attended of 4
    assert found["attendance"] == {"numerator": 3, "denominator": 4, "rate": 0.75}


def test_a_program_counts_only_its_stays() -> None:
    found = report(
        [stay("A", "2026-01-05"), stay("B", "2026-01-05", program_="adolescent-sud")],
        "2026-01-05",
        "2026-01-18",
        "2026-01-20",
        "adolescent-sud",
    )
    assert found["stays"] == 1
    assert weekly(found, "census") == [1, 1]


# -- retention, completion, length of stay ---------------------------------------------------------------------------


def retention_stays() -> list[Stay]:
    return [
        stay("A", "2026-01-05", "2026-03-30", "completed"),  # day 84, completed
        stay("B", "2026-01-05", "2026-02-19", "against-advice"),  # day 45
        stay("C", "2026-04-15"),  # ongoing: day 30 = 15 May, 60 = 14 June, 90 = 14 July
        stay("D", "2026-06-20"),  # ongoing: day 30 = 20 July
        stay("E", "2026-02-02", "2026-02-12", "administrative"),  # day 10
    ]


def test_retention_at_30_60_and_90_days() -> None:
    found = report(retention_stays(), "2026-01-01", "2026-06-30", "2026-07-15")["retention"]
    # as of 30 June: D's day 30 has not come (in no denominator), nor C's day 90
    # 30 days: A (completed), B (day 45 >= 30), C (enrolled), E (left day 10): 3 of 4
    assert found["30_days"] == {"numerator": 3, "denominator": 4, "rate": 0.75}
    # 60 days: A, C retained; B (day 45), E not: 2 of 4
    assert found["60_days"] == {"numerator": 2, "denominator": 4, "rate": 0.5}
    # 90 days: A (completer discharged at day 84 counts), B, E not; C not yet due: 1 of 3
    assert found["90_days"] == {"numerator": 1, "denominator": 3, "rate": 0.3333}


def test_a_completer_discharged_at_day_84_is_retained_at_90_days() -> None:
    completer = stay("A", "2026-01-05", "2026-03-30", "completed")
    found = report([completer], "2026-01-01", "2026-06-30", "2026-07-15")["retention"]
    assert found["90_days"] == {"numerator": 1, "denominator": 1, "rate": 1.0}


def test_a_stay_whose_day_90_has_not_come_is_not_in_the_90_day_denominator() -> None:
    found = report([stay("C", "2026-04-15")], "2026-01-01", "2026-06-30", "2026-07-15")["retention"]
    # 15 April + 90 = 14 July, after the period's end (30 June); + 60 = 14 June, within it
    assert found["90_days"] == {"numerator": 0, "denominator": 0, "rate": None}
    assert found["60_days"] == {"numerator": 1, "denominator": 1, "rate": 1.0}


def test_a_stay_whose_day_30_is_after_today_is_not_in_the_30_day_denominator() -> None:
    found = report([stay("C", "2026-04-15")], "2026-01-01", "2026-06-30", "2026-05-10")["retention"]
    # 15 April + 30 = 15 May, after today (10 May)
    assert found["30_days"]["denominator"] == 0


def test_completion_rate_and_median_length_of_stay() -> None:
    found = report(retention_stays(), "2026-01-01", "2026-06-30", "2026-07-15")
    # discharged in the period: A completed (84 days), B against advice (45), E administrative (10)
    assert found["completion"] == {"numerator": 1, "denominator": 3, "rate": 0.3333}
    assert found["discharge_reasons"] == {"administrative": 1, "against-advice": 1, "completed": 1}
    # median of 10, 45, 84
    assert found["median_length_of_stay_days"] == 45


def test_median_length_of_stay_of_an_even_count() -> None:
    found = report(
        [stay("A", "2026-01-05", "2026-03-30"), stay("B", "2026-01-05", "2026-02-19", "against-advice")],
        "2026-01-01",
        "2026-06-30",
        "2026-07-15",
    )
    # (45 + 84) / 2 = 64.5
    assert found["median_length_of_stay_days"] == 64.5


def test_no_discharges_has_no_median_length_of_stay() -> None:
    found = report([stay("C", "2026-04-15")], "2026-04-01", "2026-04-30", "2026-05-01")
    assert found["median_length_of_stay_days"] is None
    assert found["completion"] == {"numerator": 0, "denominator": 0, "rate": None}


# -- attendance and the ASAM minimum ---------------------------------------------------------------------------------


def test_attendance_rate_counts_sessions_scheduled_in_the_period() -> None:
    sessions = [
        session("2026-01-02", "no-show"),  # before the period
        session("2026-01-05", "attended"),
        session("2026-01-06", "late"),
        session("2026-01-07", "no-show"),
        session("2026-01-08", "cancelled-by-program"),  # never owed by the patient
    ]
    found = report([stay("A", "2025-12-29", sessions=sessions)], "2026-01-05", "2026-01-11", "2026-01-20")
    # in the period and scheduled: attended, late, no-show: 2 of 3
    assert found["attendance"] == {"numerator": 2, "denominator": 3, "rate": 0.6667}
    assert weekly(found, "sessions_scheduled") == [3]
    assert weekly(found, "sessions_attended") == [2]


def asam_stays() -> list[Stay]:
    adult = stay(
        "ADULT",
        "2026-01-05",
        sessions=[session(d) for d in ("2026-01-05", "2026-01-07", "2026-01-09")]  # week 1: 9 h
        + [session(d) for d in ("2026-01-12", "2026-01-14")]  # week 2: 6 h
        + [session(d) for d in ("2026-01-19", "2026-01-21", "2026-01-23")],  # week 3: 9 h
    )
    adolescent = stay(
        "TEEN",
        "2026-01-08",  # Thursday: week 1 has 4 days, minimum 6 x 4/7 = 3.43
        program_="adolescent-sud",
        sessions=[session("2026-01-08")]  # week 1: 3 h
        + [session("2026-01-12"), session("2026-01-14")],  # week 2: 6 h; week 3: none
    )
    return [adult, adolescent]


def test_share_of_patient_weeks_meeting_the_asam_minimum() -> None:
    found = report(asam_stays(), "2026-01-05", "2026-01-25", "2026-01-28")
    # adult (9 h a week): 9 yes, 6 no, 9 yes; adolescent (6 h): 3 < 3.43 no, 6 yes, 0 no: 3 of 6
    assert found["asam_minimum"] == {"numerator": 3, "denominator": 6, "rate": 0.5}
    assert weekly(found, "patient_weeks") == [2, 2, 2]
    assert weekly(found, "patient_weeks_meeting_minimum") == [1, 1, 1]


def test_a_week_in_progress_has_no_patient_weeks() -> None:
    found = report(asam_stays(), "2026-01-05", "2026-01-25", "2026-01-21")
    # today Wednesday 21 January: the week of 19 January is in progress, not judged; 2 of 4 before it
    assert weekly(found, "in_progress") == [False, False, True]
    assert weekly(found, "patient_weeks") == [2, 2, 0]
    assert found["asam_minimum"] == {"numerator": 2, "denominator": 4, "rate": 0.5}


# -- drug screens ----------------------------------------------------------------------------------------------------


def test_negative_screen_rate_by_week() -> None:
    on_buprenorphine = stay(
        "A",
        "2026-01-05",
        sessions=[screened("2026-01-05", ethanol="negative"), screened("2026-01-12", buprenorphine="positive")],
        medications=[{"medication": "buprenorphine-naloxone", "status": "active", "start": "2026-01-05"}],
    )
    other = stay(
        "B",
        "2026-01-05",
        sessions=[screened("2026-01-06", cocaine="positive"), screened("2026-01-13", cocaine="negative")],
    )
    found = report([on_buprenorphine, other], "2026-01-05", "2026-01-18", "2026-01-20")
    # week 1: A negative, B positive: 1 of 2; week 2: A expected-positive (prescribed), B negative: 2 of 2
    assert weekly(found, "screens") == [2, 2]
    assert weekly(found, "screens_negative") == [1, 2]
    assert weekly(found, "negative_screen_rate") == [0.5, 1.0]
    # period: 3 of 4, of which 2 negative, 1 expected-positive, 1 positive
    drug_screens = found["drug_screens"]
    assert (drug_screens["numerator"], drug_screens["denominator"], drug_screens["rate"]) == (3, 4, 0.75)
    assert (drug_screens["negative"], drug_screens["expected_positive"], drug_screens["positive"]) == (2, 1, 1)


# -- PHQ-9 -----------------------------------------------------------------------------------------------------------


def test_phq9_response_and_remission_count_stays_with_a_baseline_of_10_and_a_later_score() -> None:
    found = report(
        [
            stay("A", "2026-01-05", assessments=phq9(("2026-01-05", 12), ("2026-02-02", 6))),  # response only
            stay("B", "2026-01-05", assessments=phq9(("2026-01-05", 10), ("2026-02-02", 4))),  # both
            stay("C", "2026-01-05", assessments=phq9(("2026-01-05", 9), ("2026-02-02", 2))),  # baseline < 10
            stay("D", "2026-01-05", assessments=phq9(("2026-01-05", 15))),  # no later score
            stay("E", "2026-01-05", assessments=phq9(("2026-01-05", 20), ("2026-02-02", 15))),  # neither
        ],
        "2026-01-05",
        "2026-02-15",
        "2026-03-01",
    )
    # counted: A, B, E; response 12 -> 6 (50%), 10 -> 4 (60%), 20 -> 15 (25%): 2 of 3; remission only B: 1 of 3
    assert found["phq9_response"] == {"numerator": 2, "denominator": 3, "rate": 0.6667}
    assert found["phq9_remission"] == {"numerator": 1, "denominator": 3, "rate": 0.3333}


# -- aftercare -------------------------------------------------------------------------------------------------------


def transition(first_visit: str | None, *, accepted: bool = True) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = [{"at": "2026-02-27T20:00:00Z", "event": "sent", "status": "requested"}]
    if accepted:
        steps.append({"at": "2026-03-02T14:00:00Z", "event": "accepted", "status": "accepted"})
    if first_visit:
        steps.append(
            {
                "at": f"{first_visit}T18:00:00Z",
                "event": "scheduled",
                "status": "in-progress",
                "scheduled_for": first_visit,
            }
        )
        steps.append({"at": f"{first_visit}T20:00:00Z", "event": "first-visit-attended", "status": "in-progress"})
    return steps


def test_aftercare_linkage_rates_count_discharges_with_a_referral() -> None:
    found = report(
        [
            # discharged 27 February; first visits 9 March (10 days) and 19 March (20 days)
            stay("A", "2026-01-05", "2026-02-27", referral=REFERRAL, transition=transition("2026-03-09")),
            stay("B", "2026-01-05", "2026-02-27", referral=REFERRAL, transition=transition("2026-03-19")),
            stay("C", "2026-01-05", "2026-02-27", referral=REFERRAL, transition=transition(None, accepted=False)),
            stay("D", "2026-01-05", "2026-02-27"),  # no referral: not in the denominator
            stay("E", "2026-01-05", "2026-03-10", referral=REFERRAL, transition=transition("2026-03-12")),  # after
        ],
        "2026-01-01",
        "2026-02-28",
        "2026-04-01",
    )
    # referred discharges in the period: A, B, C; accepted A, B: 2 of 3; first visit within 14 days: A, 1 of 3
    assert found["aftercare_accepted"] == {"numerator": 2, "denominator": 3, "rate": 0.6667}
    assert found["aftercare_first_visit"] == {"numerator": 1, "denominator": 3, "rate": 0.3333}


# -- the CSV ---------------------------------------------------------------------------------------------------------


def test_csv_rows_hold_every_figure_with_its_numerator_and_denominator() -> None:
    rows = program.csv_rows(report(census_stays(), "2026-01-05", "2026-01-25", "2026-02-10"))
    assert rows[0] == ["metric", "week", "numerator", "denominator", "value"]
    assert ["stays", "", "", "", 3] in rows
    # X stayed 5 to 14 January: 9 days
    assert ["median_length_of_stay_days", "", "", "", 9] in rows
    assert ["discharge_reason.against-advice", "", "", "", 1] in rows
    assert ["completion", "", 0, 1, 0.0] in rows
    # no PHQ-9 scores: 0 of 0, the rate empty
    assert ["phq9_response", "", 0, 0, ""] in rows
    assert ["census", "2026-01-12", "", "", 3] in rows
    assert ["negative_screen_rate", "2026-01-05", "", "", ""] in rows
    # header, 4 totals, 1 discharge reason, 11 rates, 11 figures for each of 3 weeks
    assert len(rows) == 1 + 4 + 1 + 11 + 11 * 3
