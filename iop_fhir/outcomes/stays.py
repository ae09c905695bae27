"""One stay in the program (an enrollment, from admission to discharge) as the outcomes see it, built from the
records of the enrollment: its sessions (its own and its attendance at group sessions), assessments, current
treatment plan, medications, discharge and the discharge's transition steps."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from iop_fhir.config import REPO
from iop_fhir.mapping import terminology
from iop_fhir.store.base import day_of as day_of  # the day the store keeps on a record's row, read alike

MAPPINGS = REPO / "mappings"


@dataclass(frozen=True)
class Screen:
    """A drug screen: the day its specimen was collected and each analyte's result."""

    day: date
    results: tuple[tuple[str, str], ...]  # (analyte, result)


@dataclass(frozen=True)
class Session:
    """The patient's part in one session: its day (as written, the local date), service, attendance and length."""

    day: date
    service: str
    attendance: str
    hours: float
    craving: int | None = None
    screen: Screen | None = None
    group_id: str | None = None


@dataclass(frozen=True)
class Score:
    """One total score of a symptom scale, on the day of its assessment."""

    day: date
    score: int


@dataclass(frozen=True)
class Stay:
    enrollment_id: str
    patient: str | None  # the Patient's id
    program: str
    admission: date
    discharge: date | None = None
    reason: str | None = None
    sessions: tuple[Session, ...] = ()
    scores: Mapping[str, tuple[Score, ...]] = field(default_factory=dict)
    plan: Mapping[str, Any] | None = None
    # the medication records as rule expected-positives reads them: medication, status, start, end, explains
    medications: tuple[Mapping[str, Any], ...] = ()
    goal_outcomes: Mapping[str, str] = field(default_factory=dict)
    referral: Mapping[str, Any] | None = None
    transition: tuple[Mapping[str, Any], ...] = ()
    typed_summary: str | None = None

    def last_day(self, today: date) -> date:
        """The last day of the stay so far: its discharge, else today."""
        return self.discharge if self.discharge is not None else today

    def enrolled_on(self, day: date) -> bool:
        return self.admission <= day and (self.discharge is None or day <= self.discharge)


def _hours(start: Any, end: Any) -> float:
    try:
        begun, ended = datetime.fromisoformat(str(start)), datetime.fromisoformat(str(end))
    except ValueError:
        return 0.0
    if (begun.tzinfo is None) != (ended.tzinfo is None):
        return 0.0
    return max(0.0, (ended - begun) / timedelta(hours=1))


def session(content: Mapping[str, Any], group_id: str | None = None) -> Session | None:
    """A session record (or a group session's attendee merged with the group's fields) as the outcomes see it."""
    day = day_of(content.get("start"))
    if day is None:
        return None
    craving = content.get("craving_score")
    screen = None
    drug_screen = content.get("drug_screen")
    if isinstance(drug_screen, Mapping):
        collected = day_of(drug_screen.get("collected_at")) or day
        results = tuple(
            (str(r.get("analyte")), str(r.get("result")))
            for r in drug_screen.get("results") or []
            if isinstance(r, Mapping)
        )
        screen = Screen(collected, results)
    return Session(
        day=day,
        service=str(content.get("service") or ""),
        attendance=str(content.get("attendance") or ""),
        hours=_hours(content.get("start"), content.get("end")),
        craving=craving if isinstance(craving, int) and not isinstance(craving, bool) else None,
        screen=screen,
        group_id=group_id,
    )


def attendances(group: Mapping[str, Any], enrollment_id: str) -> Iterable[Mapping[str, Any]]:
    """The attendee entries of a group session record for one enrollment, each merged with the group's fields."""
    shared = {k: v for k, v in group.items() if k not in ("attendees", "group_id")}
    for attendee in group.get("attendees") or []:
        if isinstance(attendee, Mapping) and attendee.get("enrollment_id") == enrollment_id:
            yield {**shared, **attendee}


def scores(assessments: Iterable[Mapping[str, Any]]) -> dict[str, tuple[Score, ...]]:
    """Each instrument's total scores across the assessments, oldest first (a total not given is its items' sum)."""
    found: dict[str, list[Score]] = {}
    for assessment in assessments:
        day = day_of(assessment.get("performed_at"))
        if day is None:
            continue
        for instrument in assessment.get("instruments") or []:
            if not isinstance(instrument, Mapping):
                continue
            total = instrument.get("total_score")
            if total is None and isinstance(instrument.get("items"), list):
                items = [i for i in instrument["items"] if isinstance(i, int)]
                total = sum(items) if len(items) == len(instrument["items"]) else None
            if isinstance(total, int) and not isinstance(total, bool):
                found.setdefault(str(instrument.get("instrument")), []).append(Score(day, total))
    return {name: tuple(sorted(values, key=lambda s: s.day)) for name, values in found.items()}


def medication(content: Mapping[str, Any], explains: Callable[[str], Iterable[str]]) -> dict[str, Any]:
    """A medication record as rule expected-positives reads it (iop/service.py gives the session mapping the same)."""
    found = {k: content.get(k) for k in ("medication", "status", "start", "end", "source")}
    return {**found, "explains": list(explains(str(content.get("medication") or "")))}


def project_explains(code: str) -> list[str]:
    """The analytes a medication explains, from the project's terminology (property explains of iop-medication)."""
    return [str(v) for v in terminology.load(MAPPINGS / "terminology").property_values("medication", code, "explains")]


def build(
    *,
    enrollment_id: str,
    enrollment: Mapping[str, Any],
    patient: str | None,
    sessions: Iterable[Mapping[str, Any]] = (),
    group_sessions: Iterable[Mapping[str, Any]] = (),
    assessments: Iterable[Mapping[str, Any]] = (),
    plan: Mapping[str, Any] | None = None,
    medications: Iterable[Mapping[str, Any]] = (),
    discharge: Mapping[str, Any] | None = None,
    transition: Iterable[Mapping[str, Any]] = (),
    explains: Callable[[str], Iterable[str]] = project_explains,
) -> Stay | None:
    """The stay of an enrollment from the contents of its active records (retracted ones left out by the caller);
    None for an enrollment without a readable admission date."""
    admission = day_of(enrollment.get("admission_date"))
    if admission is None:
        return None
    own = [s for c in sessions if (s := session(c)) is not None]
    for group in group_sessions:
        for attendee in attendances(group, enrollment_id):
            found = session(attendee, str(group.get("group_id") or "") or None)
            if found is not None:
                own.append(found)
    outcomes = {}
    if discharge is not None:
        outcomes = {
            str(g.get("goal")): str(g.get("status"))
            for g in discharge.get("goal_outcomes") or []
            if isinstance(g, Mapping)
        }
    typed = discharge.get("summary") if discharge is not None else None
    return Stay(
        enrollment_id=enrollment_id,
        patient=patient,
        program=str(enrollment.get("program") or ""),
        admission=admission,
        discharge=day_of(discharge.get("discharge_date")) if discharge is not None else None,
        reason=str(discharge.get("reason")) if discharge is not None and discharge.get("reason") else None,
        sessions=tuple(sorted(own, key=lambda s: s.day)),
        scores=scores(assessments),
        plan=plan,
        medications=tuple(medication(m, explains) for m in medications),
        goal_outcomes=outcomes,
        referral=discharge.get("referral") if discharge is not None else None,
        transition=tuple(transition),
        typed_summary=typed if isinstance(typed, str) and typed.strip() else None,
    )
