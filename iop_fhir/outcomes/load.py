"""The stays the outcomes are computed over, read from the IOP records (the one part of this package that reads the
store): every active enrollment with its active sessions, group-session attendances, assessments, current
treatment plan, medications and discharge, and the steps of the discharge's transition. Which stays a client may
count is decided here from its Part 2 restriction: a partner's client counts only the stays of patients whose
records it may read."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iop_fhir.outcomes import rules as rules_
from iop_fhir.outcomes import stays as stays_
from iop_fhir.outcomes.rules import Rules
from iop_fhir.outcomes.stays import Stay
from iop_fhir.store.base import RecordStore, StoredRecord

ACTIVE = "active"
# Every record of a kind at once: the outcomes read a program's records whole (a few tens of thousands of rows).
_ALL = 10**9

Timeline = Callable[[StoredRecord], list[dict[str, Any]]]


@dataclass(frozen=True)
class Loaded:
    """The stays found, and the FHIR resources each was computed from (for the audit trail)."""

    stays: list[Stay]
    references: dict[str, list[str]]  # enrollment id -> the Type/id of its enrollment's resources


def patient_of(enrollment: StoredRecord) -> str | None:
    """The id of the Patient an enrollment is a stay of (its resource of role `patient`)."""
    for resource in enrollment.resources:
        if resource.get("role") == "patient" and str(resource.get("reference", "")).startswith("Patient/"):
            return str(resource["reference"]).split("/", 1)[1]
    return None


def _active(records: RecordStore, kind: str, enrollment_id: str | None) -> list[StoredRecord]:
    found, _ = records.records(kind, enrollment_id=enrollment_id, offset=0, count=_ALL)
    return [r for r in found if r.status == ACTIVE]


def load(
    records: RecordStore,
    *,
    timeline: Timeline,
    enrollment_id: str | None = None,
    patients: frozenset[str] | None = None,
    program: str | None = None,
    explains: Callable[[str], Iterable[str]] = stays_.project_explains,
) -> Loaded:
    """The stays of the active enrollments (one if ``enrollment_id``), of ``program`` if given, and only of the
    ``patients`` given (None: every patient; a partner's restriction otherwise)."""
    if enrollment_id is not None:
        one = records.record("enrollment", enrollment_id)
        enrollments = [one] if one is not None and one.status == ACTIVE else []
    else:
        enrollments = _active(records, "enrollment", None)
    chosen = {}
    for enrollment in enrollments:
        patient = patient_of(enrollment)
        if patients is not None and patient not in patients:
            continue
        if program is not None and enrollment.content.get("program") != program:
            continue
        chosen[enrollment.id] = (enrollment, patient)
    if not chosen:
        return Loaded([], {})
    scope = enrollment_id  # one enrollment: read only its records; else every record of each kind once

    def by_enrollment(kind: str) -> dict[str, list[StoredRecord]]:
        grouped: dict[str, list[StoredRecord]] = defaultdict(list)
        for record in _active(records, kind, scope):
            if record.enrollment_id in chosen:
                grouped[str(record.enrollment_id)].append(record)
        return grouped

    sessions, assessments = by_enrollment("session"), by_enrollment("assessment")
    plans, medications, discharges = (
        by_enrollment("treatment-plan"),
        by_enrollment("medication"),
        by_enrollment("discharge"),
    )
    groups = _active(records, "group-session", None)
    attended: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for group in groups:
        for attendee in group.content.get("attendees") or []:
            if isinstance(attendee, dict) and attendee.get("enrollment_id") in chosen:
                attended[str(attendee["enrollment_id"])].append({**group.content, "group_id": group.id})
    found: list[Stay] = []
    references: dict[str, list[str]] = {}
    for eid, (enrollment, patient) in chosen.items():
        discharge = max(discharges.get(eid, []), key=lambda r: r.updated, default=None)
        plan = max(
            plans.get(eid, []),
            key=lambda p: (str((p.content.get("period") or {}).get("start", "")), p.created),
            default=None,
        )
        stay = stays_.build(
            enrollment_id=eid,
            enrollment=enrollment.content,
            patient=patient,
            sessions=[r.content for r in sessions.get(eid, [])],
            group_sessions=attended.get(eid, []),
            assessments=[r.content for r in assessments.get(eid, [])],
            plan=plan.content if plan is not None else None,
            medications=[r.content for r in medications.get(eid, [])],
            discharge=discharge.content if discharge is not None else None,
            transition=timeline(discharge) if discharge is not None and discharge.content.get("referral") else (),
            explains=explains,
        )
        if stay is not None:
            found.append(stay)
            references[eid] = [str(r["reference"]) for r in enrollment.resources if r.get("reference")]
    found.sort(key=lambda s: (s.admission, s.enrollment_id))
    return Loaded(found, references)


def stays_of(loaded: Loaded, ids: Iterable[str]) -> list[Stay]:
    wanted = set(ids)
    return [s for s in loaded.stays if s.enrollment_id in wanted]


@dataclass(frozen=True)
class Reader:
    """The outcomes' view of one store: its rules, and the stays a client may count. runtime.py builds it (with the
    transition timeline of exchange/followup.py); app.extensions["iop_fhir.outcomes"] holds it."""

    records: RecordStore
    rules_dir: Path  # mappings/outcomes: its rules are read on first use
    timeline: Timeline
    explains: Callable[[str], Iterable[str]] = stays_.project_explains

    @property
    def rules(self) -> Rules:
        return rules_.load(self.rules_dir)

    @property
    def programs(self) -> frozenset[str]:
        return rules_.programs(self.rules_dir.parent)

    def stays(
        self,
        *,
        enrollment_id: str | None = None,
        patients: frozenset[str] | None = None,
        program: str | None = None,
    ) -> Loaded:
        return load(
            self.records, timeline=self.timeline, enrollment_id=enrollment_id, patients=patients, program=program
        )
