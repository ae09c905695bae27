"""The outcomes of one stay: sessions scheduled and attended, delivered treatment hours per week against the plan
and the ASAM minimum, drug screens by week, symptom scales first to latest, craving trend, goals, length of stay,
discharge reason and aftercare linkage. Weeks are calendar weeks, Monday to Sunday, so that stays add up by week
across a program; a week the stay covers only in part (admission or discharge mid-week) has the minimum, the plan
and the expected screens in proportion to its days in the stay, and a week not over yet is not judged."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from statistics import median
from typing import Any

from iop_fhir.mapping import functions
from iop_fhir.mapping.rules import DAYS
from iop_fhir.outcomes.rules import Rules
from iop_fhir.outcomes.stays import Session, Stay, day_of


def monday(day: date) -> date:
    return day - timedelta(days=day.weekday())


def ratio(numerator: int | float, denominator: int | float) -> float | None:
    """numerator / denominator to 4 places, or None when there is nothing to divide by."""
    return round(numerator / denominator, 4) if denominator else None


@dataclass(frozen=True)
class Week:
    """A calendar week of a stay."""

    start: date  # the Monday
    first: date  # the first day of the week in the stay
    last: date  # the last day of the week in the stay (so far)
    complete: bool  # the week's part of the stay is over

    @property
    def days(self) -> int:
        return (self.last - self.first).days + 1

    @property
    def share(self) -> float:
        """The part of a full week the stay covers."""
        return self.days / 7

    def holds(self, day: date) -> bool:
        return self.first <= day <= self.last


def weeks(stay: Stay, today: date) -> list[Week]:
    """The calendar weeks of the stay up to its discharge or ``today``."""
    end = stay.last_day(today)
    if end < stay.admission:
        return []
    found = []
    start = monday(stay.admission)
    while start <= end:
        sunday = start + timedelta(days=6)
        last = min(sunday, end)
        over = (stay.discharge is not None and stay.discharge <= sunday) or sunday < today
        found.append(Week(start, max(start, stay.admission), last, over and last <= today))
        start += timedelta(days=7)
    return found


def per_week(intervention: Mapping[str, Any]) -> float:
    """How many times a week a plan intervention recurs."""
    try:
        frequency = float(intervention.get("frequency") or 0)
        period = float(intervention.get("period") or 1)
    except (TypeError, ValueError):
        return 0.0
    span = period * DAYS.get(str(intervention.get("period_unit") or "wk"), DAYS["wk"]) / DAYS["wk"]
    return frequency / span if span > 0 else 0.0


def planned_hours(plan: Mapping[str, Any] | None, rules: Rules) -> float | None:
    """The treatment hours a week the plan schedules: its weekly_treatment_hours (rule weekly-hours, stored with
    the plan), worked out the same way for a plan stored without it."""
    if plan is None:
        return None
    stored = plan.get("weekly_treatment_hours")
    if isinstance(stored, (int, float)) and not isinstance(stored, bool):
        return float(stored)
    total = 0.0
    for intervention in plan.get("interventions") or []:
        minutes = intervention.get("minutes") if isinstance(intervention, Mapping) else None
        if isinstance(minutes, (int, float)) and not isinstance(minutes, bool):
            total += per_week(intervention) * minutes / 60
    return round(total, 2)


def planned_screens(plan: Mapping[str, Any] | None) -> float:
    """Drug screens a week the plan schedules."""
    if plan is None:
        return 0.0
    interventions = plan.get("interventions") or []
    return sum(per_week(i) for i in interventions if isinstance(i, Mapping) and i.get("service") == "drug-testing")


def attendance(sessions: Iterable[Session], rules: Rules) -> dict[str, Any]:
    """Sessions scheduled for the patient (not those the program cancelled), attended (late and left early
    included), and missed by reason; overall and by service."""

    def tally(group: list[Session]) -> dict[str, Any]:
        scheduled = [s for s in group if s.attendance not in rules.not_scheduled]
        attended = [s for s in scheduled if s.attendance in rules.attended]
        missed = Counter(s.attendance for s in scheduled if s.attendance not in rules.attended)
        return {
            "scheduled": len(scheduled),
            "attended": len(attended),
            "late": sum(1 for s in attended if s.attendance == "late"),
            "left_early": sum(1 for s in attended if s.attendance == "left-early"),
            "missed": dict(sorted(missed.items())),
            "cancelled_by_program": len(group) - len(scheduled),
            "rate": ratio(len(attended), len(scheduled)),
        }

    sessions = list(sessions)
    by_service: dict[str, list[Session]] = {}
    for s in sessions:
        by_service.setdefault(s.service, []).append(s)
    return {**tally(sessions), "by_service": {k: tally(v) for k, v in sorted(by_service.items())}}


def delivered(sessions: Iterable[Session], rules: Rules) -> float:
    """Hours of treatment in the sessions attended."""
    return sum(
        s.hours for s in sessions if s.attendance in rules.attended and s.service not in rules.not_treatment_hours
    )


def hours(stay: Stay, rules: Rules, today: date) -> dict[str, Any]:
    minimum = rules.minimum_hours(stay.program)
    plan = planned_hours(stay.plan, rules)
    rows: list[dict[str, Any]] = []
    for number, week in enumerate(weeks(stay, today), 1):
        got = round(delivered((s for s in stay.sessions if week.holds(s.day)), rules), 2)
        owed = round(minimum * week.share, 2)
        rows.append(
            {
                "week": number,
                "start": week.start.isoformat(),
                "days": week.days,
                "complete": week.complete,
                "delivered": got,
                "planned": round(plan * week.share, 2) if plan is not None else None,
                "minimum": owed,
                "meets_minimum": got >= owed if week.complete else None,
            }
        )
    judged = [r for r in rows if r["complete"]]
    return {
        "minimum_per_week": minimum,
        "planned_per_week": plan,
        "weeks": rows,
        "weeks_judged": len(judged),
        "weeks_meeting_minimum": sum(1 for r in judged if r["meets_minimum"]),
        "weeks_below_minimum": [r["week"] for r in judged if not r["meets_minimum"]],
        "median_per_week": round(median(r["delivered"] for r in judged), 2) if judged else None,
    }


def classify(stay: Stay, rules: Rules, results: Iterable[tuple[str, str]], day: date) -> str:
    """A screen is positive when a positive analyte is not explained by a medication the patient takes that day
    (rule expected-positives, mapping/functions.py), expected-positive when every positive one is, inconclusive
    when a result is inconclusive or invalid and none positive, else negative."""
    results = list(results)
    positive = [analyte for analyte, result in results if result == "positive"]
    collected = day.isoformat()
    for analyte in positive:
        result = {"analyte": analyte, "result": "positive"}
        if functions.explaining_medication(result, collected, stay.medications) is None:
            return "positive"
    if positive:
        return "expected-positive"
    if any(result in ("inconclusive", "invalid") for _, result in results):
        return "inconclusive"
    return "negative"


SCREEN_CLASSES = ("negative", "expected-positive", "positive", "inconclusive")


def screens(stay: Stay, rules: Rules, today: date) -> dict[str, Any]:
    """Drug screens by week, each classified; a complete week with fewer screens than the plan schedules has the
    rest missed (a plan without drug testing: the drug-testing sessions missed)."""
    expected_weekly = planned_screens(stay.plan)
    rows: list[dict[str, Any]] = []
    for number, week in enumerate(weeks(stay, today), 1):
        taken = [s.screen for s in stay.sessions if s.screen is not None and week.holds(s.screen.day)]
        counts = Counter(classify(stay, rules, screen.results, screen.day) for screen in taken)
        if expected_weekly:
            missed = max(0, math.floor(expected_weekly * week.share + 1e-9) - len(taken)) if week.complete else 0
        else:
            missed = sum(
                1
                for s in stay.sessions
                if s.service == "drug-testing"
                and week.holds(s.day)
                and s.attendance not in rules.attended
                and s.attendance not in rules.not_scheduled
            )
        rows.append(
            {
                "week": number,
                "start": week.start.isoformat(),
                "screens": len(taken),
                **{name.replace("-", "_"): counts.get(name, 0) for name in SCREEN_CLASSES},
                "missed": missed,
            }
        )
    totals = {key: sum(r[key] for r in rows) for key in ("screens", "negative", "expected_positive", "positive")}
    totals["inconclusive"] = sum(r["inconclusive"] for r in rows)
    totals["missed"] = sum(r["missed"] for r in rows)
    negative = totals["negative"] + totals["expected_positive"]
    return {**totals, "negative_rate": ratio(negative, totals["screens"]), "weeks": rows}


def scale(name: str, values: tuple[Any, ...], rules: Rules) -> dict[str, Any]:
    """A symptom scale first to latest: change, and response and remission as rules.yaml defines them (None until
    there is a later score than the first)."""
    first, latest = values[0], values[-1]
    definition = rules.instruments.get(name)
    later = len(values) > 1
    change = latest.score - first.score if later else None
    response = remission = None
    if later and definition is not None:
        if first.score > 0:
            response = (first.score - latest.score) / first.score >= definition.response_reduction
        if definition.remission_below is not None:
            remission = latest.score < definition.remission_below
    return {
        "count": len(values),
        "first": {"date": first.day.isoformat(), "score": first.score},
        "latest": {"date": latest.day.isoformat(), "score": latest.score},
        "change": change,
        "percent_change": round(100 * change / first.score, 1) if change is not None and first.score else None,
        "response": response,
        "remission": remission,
        "scores": [{"date": v.day.isoformat(), "score": v.score} for v in values],
    }


def craving(stay: Stay, rules: Rules) -> dict[str, Any] | None:
    """Craving reported at attended sessions: first, latest and the trend (least-squares slope, points a week)."""
    points = [(s.day, s.craving) for s in stay.sessions if s.craving is not None and s.attendance in rules.attended]
    if not points:
        return None
    xs = [(day - stay.admission).days / 7 for day, _ in points]
    ys = [float(score) for _, score in points]
    slope = None
    if len(points) > 1 and len(set(xs)) > 1:
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    trend = None
    if slope is not None:
        trend = "flat" if abs(slope) <= rules.craving_flat_within else "falling" if slope < 0 else "rising"
    return {
        "first": {"date": points[0][0].isoformat(), "score": points[0][1]},
        "latest": {"date": points[-1][0].isoformat(), "score": points[-1][1]},
        "change": points[-1][1] - points[0][1],
        "slope_per_week": round(slope, 3) if slope is not None else None,
        "trend": trend,
        "points": [{"date": d.isoformat(), "score": s} for d, s in points],
    }


def goals(stay: Stay, rules: Rules) -> dict[str, Any]:
    """The plan's goals with their outcome at discharge."""
    rows: list[dict[str, Any]] = []
    for goal in (stay.plan or {}).get("goals") or []:
        if not isinstance(goal, Mapping):
            continue
        status = stay.goal_outcomes.get(str(goal.get("key")))
        rows.append(
            {
                "key": goal.get("key"),
                "description": goal.get("description"),
                "measure": goal.get("measure"),
                "target": goal.get("target"),
                "due": goal.get("due"),
                "status": status,
                "achieved": status in rules.goal_achieved if status is not None else None,
            }
        )
    return {"goals": rows, "achieved": sum(1 for r in rows if r["achieved"]), "total": len(rows)}


def aftercare(stay: Stay, rules: Rules, today: date | None = None) -> dict[str, Any]:
    """The referral to aftercare and how far its transition went: accepted, first visit (the date the partner
    scheduled it for, else when it was reported) and whether it was within the window after discharge (None while
    the window is still open on ``today`` and no visit is known)."""
    referral = stay.referral
    if not referral:
        return {
            "referred": False,
            "partner": None,
            "accepted": False,
            "first_visit": None,
            "first_visit_in_window": None,
        }
    accepted_at = first_visit = None
    scheduled = None
    for step in stay.transition:
        event = step.get("event")
        if step.get("scheduled_for"):
            scheduled = day_of(step.get("scheduled_for"))
        if event in rules.accepted_events and accepted_at is None:
            accepted_at = step.get("at")
        if event == "first-visit-attended" and first_visit is None:
            first_visit = scheduled or day_of(step.get("at"))
    window = None
    if stay.discharge is not None:
        closes = stay.discharge + timedelta(days=rules.first_visit_within_days)
        if first_visit is not None:
            window = first_visit <= closes
        elif today is None or today > closes:
            window = False
    last = stay.transition[-1] if stay.transition else None
    return {
        "referred": True,
        "partner": referral.get("partner"),
        "service": referral.get("service"),
        "accepted": accepted_at is not None,
        "accepted_at": accepted_at,
        "first_visit": first_visit.isoformat() if first_visit else None,
        "first_visit_in_window": window,
        "window_days": rules.first_visit_within_days,
        "status": last.get("event") if last else "not-sent",
    }


def outcomes(stay: Stay, rules: Rules, today: date) -> dict[str, Any]:
    """Everything the program reports of one stay."""
    end = stay.last_day(today)
    return {
        "enrollment_id": stay.enrollment_id,
        "patient": f"Patient/{stay.patient}" if stay.patient else None,
        "program": stay.program,
        "admission_date": stay.admission.isoformat(),
        "discharge_date": stay.discharge.isoformat() if stay.discharge else None,
        "discharge_reason": stay.reason,
        "length_of_stay_days": (end - stay.admission).days,
        "ongoing": stay.discharge is None,
        "attendance": attendance(stay.sessions, rules),
        "hours": hours(stay, rules, today),
        "drug_screens": screens(stay, rules, today),
        "instruments": {name: scale(name, values, rules) for name, values in sorted(stay.scores.items()) if values},
        "craving": craving(stay, rules),
        "goals": goals(stay, rules),
        "aftercare": aftercare(stay, rules, today),
    }


def summary(found: Mapping[str, Any]) -> str:
    """One paragraph of a stay's outcomes, as the discharge summary states them."""
    parts = []
    seen = found["attendance"]
    if seen["scheduled"]:
        parts.append(
            f"attended {seen['attended']} of {seen['scheduled']} scheduled sessions ({round(100 * seen['rate'])}%)"
        )
    else:
        parts.append("no sessions scheduled")
    hours_ = found["hours"]
    if hours_["weeks_judged"]:
        parts.append(
            f"{hours_['weeks_meeting_minimum']} of {hours_['weeks_judged']} weeks met the ASAM 2.1 minimum of "
            f"{hours_['minimum_per_week']:g} hours"
        )
    screens_ = found["drug_screens"]
    if screens_["screens"]:
        text = f"{screens_['negative']} of {screens_['screens']} drug screens negative"
        if screens_["expected_positive"]:
            text += f", {screens_['expected_positive']} positive only for prescribed medication"
        if screens_["missed"]:
            text += f", {screens_['missed']} missed"
        parts.append(text)
    for name, label in (("phq-9", "PHQ-9"), ("gad-7", "GAD-7"), ("audit-c", "AUDIT-C")):
        scale_ = found["instruments"].get(name)
        if scale_ and scale_["count"] > 1:
            parts.append(f"{label} {scale_['first']['score']} to {scale_['latest']['score']}")
    goals_ = found["goals"]
    if goals_["total"] and any(g["status"] for g in goals_["goals"]):
        parts.append(f"{goals_['achieved']} of {goals_['total']} goals achieved")
    text = "; ".join(parts)
    return f"{found['length_of_stay_days']} days in the program: {text}."
