"""The program's figures as FHIR Measures (mappings/outcomes/Measure-*.json, data like the terminology) and their
evaluation into MeasureReports (https://hl7.org/fhir/R4/measure-operation-evaluate-measure.html). Each population's
``criteria.expression`` names one of POPULATIONS below, computed with the population helpers of program.py, so
that a MeasureReport counts exactly what the JSON report of program.outcomes counts. Pure: which stays a client may
count is decided by the caller (load.py, from its Part 2 restriction)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from iop_fhir.mapping.engine import PART2_LABELS
from iop_fhir.outcomes import patient, program
from iop_fhir.outcomes.program import Period
from iop_fhir.outcomes.rules import Rules
from iop_fhir.outcomes.stays import Stay

LANGUAGE = "text/x-iop-fhir-outcomes"
MEASURE_POPULATION = "http://terminology.hl7.org/CodeSystem/measure-population"
# The populations of a proportion measure, outermost first (https://hl7.org/fhir/R4/measure.html#scoring).
PROPORTION = ("initial-population", "denominator", "numerator")


@dataclass(frozen=True)
class Context:
    """What every population is computed against: the rules, the period and the day of evaluation."""

    rules: Rules
    period: Period
    today: date


# A population: the stays of the cohort (the program's stays enrolled in the period) → its members, each with the
# stay it belongs to (a stay, a session, a patient-week or a screen of that stay).
Population = Callable[[Context, list[Stay]], list[tuple[Stay, Any]]]


def _stays(found: Iterable[Stay]) -> list[tuple[Stay, Any]]:
    return [(s, s) for s in found]


def _retention(days: int, *, retained: bool) -> Population:
    def members(ctx: Context, cohort: list[Stay]) -> list[tuple[Stay, Any]]:
        eligible = program.retention_population(cohort, ctx.period, days, ctx.today)
        return _stays(s for s in eligible if not retained or program.retained(s, days, ctx.rules))

    return members


def _admitted(ctx: Context, cohort: list[Stay]) -> list[tuple[Stay, Any]]:
    return _stays(s for s in cohort if ctx.period.holds(s.admission))


def _discharged(ctx: Context, cohort: list[Stay]) -> list[tuple[Stay, Any]]:
    return _stays(program.discharged(cohort, ctx.period))


def _completed(ctx: Context, cohort: list[Stay]) -> list[tuple[Stay, Any]]:
    return _stays(program.completed(cohort, ctx.period))


def _sessions(*, attended: bool) -> Population:
    def members(ctx: Context, cohort: list[Stay]) -> list[tuple[Stay, Any]]:
        return [
            (stay, s)
            for stay in cohort
            for s in program.sessions_in(stay, ctx.period, ctx.today, ctx.rules)
            if not attended or s.attendance in ctx.rules.attended
        ]

    return members


def _weeks(*, meeting: bool) -> Population:
    def members(ctx: Context, cohort: list[Stay]) -> list[tuple[Stay, Any]]:
        return [
            (stay, week)
            for stay in cohort
            for week in program.patient_weeks(stay, ctx.period, ctx.rules, ctx.today)
            if not meeting or week["meets_minimum"]
        ]

    return members


def _screens(*, negative: bool) -> Population:
    def members(ctx: Context, cohort: list[Stay]) -> list[tuple[Stay, Any]]:
        return [
            (stay, kind)
            for stay in cohort
            for kind in program.screens_in(stay, ctx.period, ctx.rules)
            if not negative or kind in program.NEGATIVE_SCREENS
        ]

    return members


def _phq9(outcome: str | None) -> Population:
    def members(ctx: Context, cohort: list[Stay]) -> list[tuple[Stay, Any]]:
        found = program.scale_population(cohort, "phq-9", ctx.rules)
        return [(stay, scale) for stay, scale in found if outcome is None or scale[outcome]]

    return members


def _aftercare(outcome: str | None, *, due: bool = False) -> Population:
    def members(ctx: Context, cohort: list[Stay]) -> list[tuple[Stay, Any]]:
        linked = program.linkage(cohort, ctx.period, ctx.rules, ctx.today)
        return [
            (stay, found)
            for stay, found in linked
            if (outcome is None or found[outcome]) and (not due or program.first_visit_due(found))
        ]

    return members


# The criteria.expression names of the Measures (language text/x-iop-fhir-outcomes) and what each counts.
POPULATIONS: dict[str, Population] = {
    "stays-in-period": lambda ctx, cohort: _stays(cohort),
    "stays-admitted": _admitted,
    **{f"retention-{d}-eligible": _retention(d, retained=False) for d in (30, 60, 90)},
    **{f"retention-{d}-retained": _retention(d, retained=True) for d in (30, 60, 90)},
    "stays-discharged": _discharged,
    "stays-completed": _completed,
    "sessions-scheduled": _sessions(attended=False),
    "sessions-attended": _sessions(attended=True),
    "patient-weeks": _weeks(meeting=False),
    "patient-weeks-meeting-minimum": _weeks(meeting=True),
    "screens": _screens(negative=False),
    "screens-negative": _screens(negative=True),
    "phq9-baseline": _phq9(None),
    "phq9-response": _phq9("response"),
    "phq9-remission": _phq9("remission"),
    "stays-referred": _aftercare(None),
    "aftercare-accepted": _aftercare("accepted"),
    "stays-referred-first-visit-due": _aftercare(None, due=True),
    "aftercare-first-visit": _aftercare("first_visit_in_window"),
}


# -- the definitions ------------------------------------------------------------------------------------------------


def load(directory: Path) -> dict[str, dict[str, Any]]:
    """The Measures of ``directory`` (mappings/outcomes), by id; read again only when its files change."""
    directory = Path(directory)
    signature = tuple(
        (p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(directory.glob("Measure-*.json"))
    )
    return _load(directory, signature)


@lru_cache(maxsize=8)
def _load(directory: Path, signature: tuple[tuple[str, int, int], ...]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for name, _, _ in signature:
        measure = json.loads((directory / name).read_text(encoding="utf-8"))
        unknown = [e for e in expressions(measure) if e not in POPULATIONS]
        if unknown:
            raise ValueError(f"{name}: no population is named {', '.join(unknown)}")
        found[measure["id"]] = measure
    return found


def expressions(measure: Mapping[str, Any]) -> list[str]:
    """The population names a Measure's criteria give."""
    return [
        str(population["criteria"]["expression"])
        for group in measure.get("group") or []
        for population in group.get("population") or []
    ]


# -- evaluation -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """A MeasureReport, and the stays that contributed to it (counted in its initial population)."""

    report: dict[str, Any]
    stays: list[Stay]


def _code(population: Mapping[str, Any]) -> str:
    for coding in population["code"].get("coding") or []:
        if coding.get("system") == MEASURE_POPULATION:
            return str(coding["code"])
    raise ValueError("a population without a measure-population code")


def evaluation(
    measure: Mapping[str, Any],
    stays: Iterable[Stay],
    rules: Rules,
    period: Period,
    today: date,
    *,
    subject: str | None = None,
    program: str | None = None,
    now: datetime | None = None,
) -> Evaluation:
    """The MeasureReport of ``measure`` over ``stays`` for ``period`` (a summary, or, for ``subject``, a Patient id,
    an individual report over that patient's stays only), with the stays it was computed from (for the audit
    trail)."""
    chosen = [s for s in stays if subject is None or s.patient == subject]
    cohort = _cohort(chosen, period, program)
    ctx = Context(rules, period, today)
    contributing: dict[str, Stay] = {}
    groups = []
    for group in measure.get("group") or []:
        counts: dict[str, int] = {}
        populations = []
        for population in group.get("population") or []:
            members = POPULATIONS[population["criteria"]["expression"]](ctx, cohort)
            code = _code(population)
            counts[code] = len(members)
            if code == "initial-population":
                contributing.update((stay.enrollment_id, stay) for stay, _ in members)
            populations.append({"code": copy.deepcopy(population["code"]), "count": len(members)})
        found: dict[str, Any] = {"population": populations}
        if group.get("code"):
            found = {"code": copy.deepcopy(group["code"]), **found}
        score = patient.ratio(counts.get("numerator", 0), counts.get("denominator", 0))
        if score is not None:
            found["measureScore"] = {"value": score}
        groups.append(found)
    stamp = (now or datetime.now(UTC)).astimezone(UTC)
    report: dict[str, Any] = {
        "resourceType": "MeasureReport",
        "meta": {"security": copy.deepcopy(PART2_LABELS)},
        "status": "complete",
        "type": "individual" if subject is not None else "summary",
        "measure": _canonical(measure),
    }
    if subject is not None:
        report["subject"] = {"reference": f"Patient/{subject}"}
    report["date"] = stamp.isoformat(timespec="seconds").replace("+00:00", "Z")
    report["period"] = {"start": period.start.isoformat(), "end": period.end.isoformat()}
    if measure.get("improvementNotation"):
        report["improvementNotation"] = copy.deepcopy(measure["improvementNotation"])
    report["group"] = groups
    return Evaluation(report, sorted(contributing.values(), key=lambda s: (s.admission, s.enrollment_id)))


def _cohort(stays: list[Stay], period: Period, program_code: str | None) -> list[Stay]:
    return program.cohort(stays, period, program_code)


def _canonical(measure: Mapping[str, Any]) -> str:
    url = str(measure["url"])
    return f"{url}|{measure['version']}" if measure.get("version") else url
