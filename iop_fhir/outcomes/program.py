"""A program's outcomes over a period, from the outcomes of its stays: census by week, admissions and discharges,
retention, completion, length of stay, attendance, the share of patient-weeks meeting the ASAM minimum,
negative drug screens by week, PHQ-9 response and remission, and aftercare linkage. Each rate comes with its
numerator and denominator; the Measures (measures.py) count the same populations."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from statistics import median
from typing import Any

from iop_fhir.outcomes import patient
from iop_fhir.outcomes.patient import monday, ratio
from iop_fhir.outcomes.rules import Rules
from iop_fhir.outcomes.stays import Stay

# The longest period a program's outcomes cover (five years of weeks): a longer one is refused, not drawn.
MAX_PERIOD_DAYS = 5 * 366


@dataclass(frozen=True)
class Period:
    start: date
    end: date

    def holds(self, day: date | None) -> bool:
        return day is not None and self.start <= day <= self.end


def overlaps(stay: Stay, period: Period) -> bool:
    return stay.admission <= period.end and (stay.discharge is None or stay.discharge >= period.start)


def cohort(stays: Iterable[Stay], period: Period, program: str | None) -> list[Stay]:
    """The stays of ``program`` (every program when None) enrolled at some time in the period."""
    return [s for s in stays if (program is None or s.program == program) and overlaps(s, period)]


def rate(numerator: int, denominator: int) -> dict[str, Any]:
    return {"numerator": numerator, "denominator": denominator, "rate": ratio(numerator, denominator)}


# -- populations: shared with the Measures, so that the JSON and the MeasureReports count the same things -----------


def retained(stay: Stay, days: int, rules: Rules) -> bool:
    """Still enrolled ``days`` days after admission, or discharged before then having completed the program."""
    day = stay.admission + timedelta(days=days)
    return stay.discharge is None or stay.discharge >= day or (stay.reason in rules.retained_reasons)


def retention_population(stays: Iterable[Stay], period: Period, days: int, today: date) -> list[Stay]:
    """Admissions in the period whose day ``days`` has come (by the period's end and today)."""
    horizon = min(period.end, today)
    return [s for s in stays if period.holds(s.admission) and s.admission + timedelta(days=days) <= horizon]


def discharged(stays: Iterable[Stay], period: Period) -> list[Stay]:
    return [s for s in stays if period.holds(s.discharge)]


def sessions_in(stay: Stay, period: Period, today: date, rules: Rules) -> list[Any]:
    """The stay's sessions scheduled for the patient in the period, up to today."""
    horizon = min(period.end, today)
    return [s for s in stay.sessions if period.start <= s.day <= horizon and s.attendance not in rules.not_scheduled]


def patient_weeks(stay: Stay, period: Period, rules: Rules, today: date) -> list[dict[str, Any]]:
    """The stay's complete weeks that start in the period (by their Monday), with the hours delivered."""
    rows = patient.hours(stay, rules, today)["weeks"]
    first, last = monday(period.start), period.end
    return [r for r in rows if r["complete"] and first <= date.fromisoformat(r["start"]) <= last]


def screens_in(stay: Stay, period: Period, rules: Rules) -> list[str]:
    """The classes of the stay's drug screens collected in the period."""
    return [
        patient.classify(stay, rules, s.screen.results, s.screen.day)
        for s in stay.sessions
        if s.screen is not None and period.holds(s.screen.day)
    ]


def scale_population(stays: Iterable[Stay], name: str, rules: Rules) -> list[tuple[Stay, dict[str, Any]]]:
    """Stays whose first score on the scale is at least its baseline and that have a later score."""
    definition = rules.instruments[name]
    found = []
    for stay in stays:
        values = stay.scores.get(name) or ()
        if len(values) > 1 and values[0].score >= (definition.baseline_at_least or 0):
            found.append((stay, patient.scale(name, values, rules)))
    return found


def referred(stays: Iterable[Stay], period: Period) -> list[Stay]:
    """Discharges in the period with a referral to aftercare."""
    return [s for s in discharged(stays, period) if s.referral]


# The discharge reason of a completed stay (vocabulary discharge-reason).
COMPLETED = "completed"
# The classes of a drug screen counted as negative: no positive result that a medication taken does not explain.
NEGATIVE_SCREENS = frozenset({"negative", "expected-positive"})


def completed(stays: Iterable[Stay], period: Period) -> list[Stay]:
    """Discharges in the period that completed the program."""
    return [s for s in discharged(stays, period) if s.reason == COMPLETED]


def linkage(stays: Iterable[Stay], period: Period, rules: Rules, today: date) -> list[tuple[Stay, dict[str, Any]]]:
    """The referred discharges of the period, each with its aftercare linkage as of ``today``."""
    return [(s, patient.aftercare(s, rules, today)) for s in referred(stays, period)]


def first_visit_due(found: dict[str, Any]) -> bool:
    """Whether a linkage's first-visit window is decided: a visit is known, or the window has closed."""
    return found["first_visit_in_window"] is not None


# -- the report -----------------------------------------------------------------------------------------------------


def outcomes(
    stays: Iterable[Stay], rules: Rules, period: Period, today: date, program: str | None = None
) -> dict[str, Any]:
    """The program's outcomes for the period."""
    group = cohort(stays, period, program)
    horizon = min(period.end, today)
    weeks: list[date] = []
    start = monday(period.start)
    while start <= period.end:
        weeks.append(start)
        start += timedelta(days=7)

    def in_week(week: date, day: date) -> bool:
        return week <= day <= week + timedelta(days=6)

    # Each stay's complete weeks, sessions and screens, worked out once and grouped by calendar week.
    week_rows: dict[str, list[dict[str, Any]]] = {}
    week_sessions: dict[date, list[Any]] = {}
    week_screens: dict[date, Counter[str]] = {}
    for stay in group:
        for row in patient_weeks(stay, period, rules, today):
            week_rows.setdefault(row["start"], []).append(row)
        for s in sessions_in(stay, period, today, rules):
            week_sessions.setdefault(monday(s.day), []).append(s)
        for s in stay.sessions:
            if s.screen is not None and period.holds(s.screen.day):
                kind = patient.classify(stay, rules, s.screen.results, s.screen.day)
                week_screens.setdefault(monday(s.screen.day), Counter())[kind] += 1
    by_week = []
    for week in weeks:
        first, last = max(week, period.start), min(week + timedelta(days=6), period.end)
        census = sum(1 for s in group if s.admission <= last and (s.discharge is None or s.discharge >= first))
        screened = week_screens.get(week, Counter())
        sessions = week_sessions.get(week, [])
        attended = sum(1 for s in sessions if s.attendance in rules.attended)
        screens_total = sum(screened.values())
        negative = sum(screened[kind] for kind in NEGATIVE_SCREENS)
        weekly_hours = week_rows.get(week.isoformat(), [])
        by_week.append(
            {
                "week": week.isoformat(),
                "census": census,
                "admissions": sum(1 for s in group if in_week(week, s.admission) and period.holds(s.admission)),
                "discharges": sum(
                    1 for s in group if s.discharge and in_week(week, s.discharge) and period.holds(s.discharge)
                ),
                "sessions_scheduled": len(sessions),
                "sessions_attended": attended,
                "attendance_rate": ratio(attended, len(sessions)),
                "screens": screens_total,
                "screens_negative": negative,
                "negative_screen_rate": ratio(negative, screens_total),
                "patient_weeks": len(weekly_hours),
                "patient_weeks_meeting_minimum": sum(1 for r in weekly_hours if r["meets_minimum"]),
                "in_progress": week + timedelta(days=6) >= today,
            }
        )

    admitted = [s for s in group if period.holds(s.admission)]
    leaving = discharged(group, period)
    reasons = Counter(s.reason or "unknown" for s in leaving)
    retention = {}
    for days in rules.retention_days:
        eligible = retention_population(group, period, days, today)
        retention[f"{days}_days"] = rate(sum(1 for s in eligible if retained(s, days, rules)), len(eligible))
    scheduled = [s for stay in group for s in sessions_in(stay, period, today, rules)]
    weeks_all = [r for rows in week_rows.values() for r in rows]
    classes = Counter(c for stay in group for c in screens_in(stay, period, rules))
    phq = scale_population(group, "phq-9", rules)
    linked = [found for _, found in linkage(group, period, rules, today)]
    decided = [found for found in linked if first_visit_due(found)]
    stays_ = [s.last_day(horizon) for s in leaving]
    return {
        "program": program,
        "period": {"start": period.start.isoformat(), "end": period.end.isoformat()},
        "as_of": horizon.isoformat(),
        "stays": len(group),
        "admissions": len(admitted),
        "discharges": len(leaving),
        "discharge_reasons": dict(sorted(reasons.items())),
        "retention": retention,
        "completion": rate(len(completed(group, period)), len(leaving)),
        "median_length_of_stay_days": median((s.discharge - s.admission).days for s in leaving if s.discharge)
        if stays_
        else None,
        "attendance": rate(sum(1 for s in scheduled if s.attendance in rules.attended), len(scheduled)),
        "asam_minimum": rate(sum(1 for r in weeks_all if r["meets_minimum"]), len(weeks_all)),
        "drug_screens": {
            **rate(sum(classes[kind] for kind in NEGATIVE_SCREENS), sum(classes.values())),
            "negative": classes["negative"],
            "expected_positive": classes["expected-positive"],
            "positive": classes["positive"],
            "inconclusive": classes["inconclusive"],
        },
        "phq9_response": rate(sum(1 for _, s in phq if s["response"]), len(phq)),
        "phq9_remission": rate(sum(1 for _, s in phq if s["remission"]), len(phq)),
        "aftercare_accepted": rate(sum(1 for found in linked if found["accepted"]), len(linked)),
        # referrals whose first-visit window has closed by today, or whose first visit is known
        "aftercare_first_visit": rate(sum(1 for found in decided if found["first_visit_in_window"]), len(decided)),
        "weeks": by_week,
    }


# Rates of the report (their key) as rows of the CSV.
RATES = (
    "retention.30_days",
    "retention.60_days",
    "retention.90_days",
    "completion",
    "attendance",
    "asam_minimum",
    "drug_screens",
    "phq9_response",
    "phq9_remission",
    "aftercare_accepted",
    "aftercare_first_visit",
)
WEEKLY = (
    "census",
    "admissions",
    "discharges",
    "sessions_scheduled",
    "sessions_attended",
    "attendance_rate",
    "screens",
    "screens_negative",
    "negative_screen_rate",
    "patient_weeks",
    "patient_weeks_meeting_minimum",
)


def csv_rows(report: Mapping[str, Any]) -> list[list[Any]]:
    """The report as one table (long form): metric, week (empty for the whole period), numerator, denominator,
    value."""
    rows: list[list[Any]] = [["metric", "week", "numerator", "denominator", "value"]]
    for name in ("stays", "admissions", "discharges", "median_length_of_stay_days"):
        rows.append([name, "", "", "", report[name]])
    for reason, count in report["discharge_reasons"].items():
        rows.append([f"discharge_reason.{reason}", "", "", "", count])
    for key in RATES:
        found: Any = report
        for part in key.split("."):
            found = found[part]
        rows.append([key, "", found["numerator"], found["denominator"], found["rate"]])
    for week in report["weeks"]:
        for key in WEEKLY:
            rows.append([key, week["week"], "", "", week[key]])
    return [["" if v is None else v for v in row] for row in rows]
