"""The stays the outcomes are computed over, read from the IOP records (the one part of this package that reads the
store): the active enrollments (of a period: those whose stay can overlap it, found by the days the store keeps on
their rows) with their active sessions, group-session attendances, assessments, current treatment plan, medications
and discharge, and the steps of the discharge's transition; only the records of the enrollments chosen are read.
Which stays a client may count is decided here from its Part 2 restriction: a partner's client counts only the
stays of patients whose records it may read. A Reader keeps the stays it built (StayCache) and uses one again only
while the key of what it was built from, read from the database on every request, is unchanged; it also keeps the
reports computed over them (ReportCache), used again only for the same stays under the same keys."""

from __future__ import annotations

import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iop_fhir.outcomes import rules as rules_
from iop_fhir.outcomes import stays as stays_
from iop_fhir.outcomes.program import Period
from iop_fhir.outcomes.rules import Rules
from iop_fhir.outcomes.stays import Stay
from iop_fhir.store.base import RecordStore, StoredRecord

ACTIVE = "active"
# Every enrollment at once, when no period is given: the whole program's stays.
_ALL = 10**9
# The kinds of an enrollment's own records a stay is built from.
KINDS = ("session", "assessment", "treatment-plan", "medication", "discharge")
# The role of the Task a discharge's transition timeline is read from (exchange/followup.py).
TRANSITION_TASK = "referral-task"
# The stays a process keeps built (StayCache): a few big programs' periods.
STAYS_KEPT = 20_000
# The reports a process keeps computed (ReportCache): a few periods of each program, and of each partner.
REPORTS_KEPT = 64

# The transition steps of many discharges by their ids (exchange/followup.py timelines), all read at once.
Timelines = Callable[[list[StoredRecord]], Mapping[str, list[dict[str, Any]]]]


@dataclass(frozen=True)
class Loaded:
    """The stays found, and the FHIR resources each was computed from (for the audit trail)."""

    stays: list[Stay]
    references: dict[str, list[str]]  # enrollment id -> the Type/id of its enrollment's resources
    # What the stays were built from, read for this request: each chosen enrollment's (id, key, transition Task
    # versions) in id order (a Reader's stays; None from ``load``, which keeps nothing), and whether every stay was
    # taken as kept, none built by this request.
    built_from: tuple[tuple[str, tuple[Any, ...], tuple[tuple[str, int | None], ...]], ...] | None = None
    all_kept: bool = False


def patient_of(enrollment: StoredRecord) -> str | None:
    """The id of the Patient an enrollment is a stay of (its resource of role `patient`)."""
    for resource in enrollment.resources:
        if resource.get("role") == "patient" and str(resource.get("reference", "")).startswith("Patient/"):
            return str(resource["reference"]).split("/", 1)[1]
    return None


def _active(records: RecordStore, kind: str, enrollment_id: str | None) -> list[StoredRecord]:
    found, _ = records.records(kind, enrollment_id=enrollment_id, offset=0, count=_ALL)
    return [r for r in found if r.status == ACTIVE]


def _chosen(
    records: RecordStore,
    *,
    enrollment_id: str | None,
    patients: frozenset[str] | None,
    program: str | None,
    period: Period | None,
) -> dict[str, tuple[StoredRecord, str | None]]:
    """The enrollments whose stays are asked for, by id, each with its Patient's id."""
    if enrollment_id is not None:
        one = records.record("enrollment", enrollment_id)
        enrollments = [one] if one is not None and one.status == ACTIVE else []
    elif period is not None:
        enrollments = records.enrollments_during(period.start, period.end)
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
    return chosen


def transition_task(discharge: StoredRecord) -> str | None:
    """The Task (Type/id) a discharge's transition timeline is read from, if it asks for a referral."""
    if not discharge.content.get("referral"):
        return None
    return next((str(r["reference"]) for r in discharge.resources if r.get("role") == TRANSITION_TASK), None)


def _built(
    records: RecordStore,
    chosen: Mapping[str, tuple[StoredRecord, str | None]],
    *,
    timelines: Timelines,
    explains: Callable[[str], Iterable[str]],
    before_transitions: Callable[[list[StoredRecord]], None] | None = None,
) -> dict[str, tuple[Stay | None, StoredRecord | None]]:
    """Each chosen enrollment's stay (None without a readable admission) and its latest discharge, from its records
    read now. ``before_transitions`` is told the discharges whose transitions are about to be read."""
    if not chosen:
        return {}
    # kind -> enrollment id -> its active records of that kind, oldest first
    grouped: dict[str, dict[str, list[StoredRecord]]] = {kind: defaultdict(list) for kind in KINDS}
    for record in records.records_of(KINDS, list(chosen)):
        if record.status == ACTIVE and record.enrollment_id in chosen:
            grouped[record.kind][str(record.enrollment_id)].append(record)
    sessions, assessments = grouped["session"], grouped["assessment"]
    plans, medications, discharges = grouped["treatment-plan"], grouped["medication"], grouped["discharge"]
    groups = [g for g in records.group_sessions_of(list(chosen)) if g.status == ACTIVE]
    attended: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for group in groups:
        for attendee in group.content.get("attendees") or []:
            if isinstance(attendee, dict) and attendee.get("enrollment_id") in chosen:
                attended[str(attendee["enrollment_id"])].append({**group.content, "group_id": group.id})
    # each enrollment's latest discharge, and the steps of the transitions of those with a referral
    latest = {eid: max(discharges[eid], key=lambda r: r.updated) for eid in chosen if discharges.get(eid)}
    referred = [d for d in latest.values() if d.content.get("referral")]
    if before_transitions is not None:
        before_transitions(referred)
    transitions = timelines(referred)
    found: dict[str, tuple[Stay | None, StoredRecord | None]] = {}
    for eid, (enrollment, patient) in chosen.items():
        discharge = latest.get(eid)
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
            transition=transitions.get(discharge.id, ()) if discharge is not None else (),
            explains=explains,
        )
        found[eid] = (stay, discharge)
    return found


def _loaded(
    chosen: Mapping[str, tuple[StoredRecord, str | None]],
    stays: Mapping[str, Stay | None],
    kept: Mapping[str, Kept] | None = None,
    all_kept: bool = False,
) -> Loaded:
    found: list[Stay] = []
    references: dict[str, list[str]] = {}
    for eid, (enrollment, _) in chosen.items():
        stay = stays.get(eid)
        if stay is not None:
            found.append(stay)
            references[eid] = [str(r["reference"]) for r in enrollment.resources if r.get("reference")]
    found.sort(key=lambda s: (s.admission, s.enrollment_id))
    if kept is None:
        return Loaded(found, references)
    built_from = tuple((eid, kept[eid].key, kept[eid].tasks) for eid in sorted(chosen))
    return Loaded(found, references, built_from, all_kept)


def load(
    records: RecordStore,
    *,
    timelines: Timelines,
    enrollment_id: str | None = None,
    patients: frozenset[str] | None = None,
    program: str | None = None,
    period: Period | None = None,
    explains: Callable[[str], Iterable[str]] = stays_.project_explains,
) -> Loaded:
    """The stays of the active enrollments (one if ``enrollment_id``), of ``program`` if given, and only of the
    ``patients`` given (None: every patient; a partner's restriction otherwise). With ``period``, the stays that can
    overlap it (at least every one program.cohort counts for it, maybe a few more), not the program's every stay."""
    chosen = _chosen(records, enrollment_id=enrollment_id, patients=patients, program=program, period=period)
    built = _built(records, chosen, timelines=timelines, explains=explains)
    return _loaded(chosen, {eid: stay for eid, (stay, _) in built.items()})


@dataclass(frozen=True)
class Kept:
    """A stay as built, and what it was built from: the key of its enrollment and records when they were read
    (before the records themselves), and the Tasks its transition was read from with their versions then."""

    key: tuple[Any, ...]
    tasks: tuple[tuple[str, int | None], ...]
    stay: Stay | None


class StayCache:
    """The stays one process has built, by enrollment id, the least recently used dropped beyond ``size``. Several
    processes write the records, so an entry is used only when the key read from the database for the request
    matches the one it was built under: never trusted for a while, never told of a change."""

    def __init__(self, size: int = STAYS_KEPT) -> None:
        self.size = size
        self._kept: OrderedDict[str, Kept] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._kept)

    def get(self, enrollment_id: str) -> Kept | None:
        with self._lock:
            kept = self._kept.get(enrollment_id)
            if kept is not None:
                self._kept.move_to_end(enrollment_id)
            return kept

    def put(self, enrollment_id: str, kept: Kept) -> None:
        with self._lock:
            self._kept[enrollment_id] = kept
            self._kept.move_to_end(enrollment_id)
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)


def cached(
    records: RecordStore,
    cache: StayCache,
    chosen: Mapping[str, tuple[StoredRecord, str | None]],
    *,
    timelines: Timelines,
    explains: Callable[[str], Iterable[str]],
) -> tuple[dict[str, Kept], bool]:
    """The stays of the chosen enrollments as ``load`` builds them, each with the key it was built under, taken from
    ``cache`` for each one whose key read now (its enrollment's version, the key of its records and group sessions,
    its transition Task's current version) is the one it was built under, built from its records for the others
    (and kept); and whether every one was taken from ``cache``.

    Every key is read before the records a stay is built from, so an entry is never older than its key: a write
    that lands in between leaves the entry under the older key, rebuilt on the next request. What else a stay is
    built from cannot change while the process runs: ``explains`` is the terminology loaded when the process
    started (the rules apply to the stays afterwards, on every request)."""
    if not chosen:
        return {}, True
    keys = records.stay_keys(KINDS, list(chosen))
    wanted = {
        eid: (enrollment.status, enrollment.version, enrollment.updated, keys.get(eid))
        for eid, (enrollment, _) in chosen.items()
    }
    candidates: dict[str, Kept] = {}
    for eid, key in wanted.items():
        kept = cache.get(eid)
        if kept is not None and kept.key == key:
            candidates[eid] = kept
    found: dict[str, Kept] = {}
    if candidates:
        current = records.current_versions(ref for kept in candidates.values() for ref, _ in kept.tasks)
        for eid, kept in candidates.items():
            if all(current.get(ref) == version for ref, version in kept.tasks):
                found[eid] = kept
    missing = {eid: chosen[eid] for eid in chosen if eid not in found}
    if not missing:
        return found, True
    tasks: dict[str, int] = {}

    def read_tasks(discharges: list[StoredRecord]) -> None:
        tasks.update(records.current_versions(t for d in discharges if (t := transition_task(d)) is not None))

    for eid, (stay, discharge) in _built(
        records, missing, timelines=timelines, explains=explains, before_transitions=read_tasks
    ).items():
        task = transition_task(discharge) if discharge is not None else None
        read = ((task, tasks.get(task)),) if task is not None else ()
        found[eid] = Kept(wanted[eid], read, stay)
        cache.put(eid, found[eid])
    return found, False


class ReportCache:
    """The reports one process has computed, by the key of everything each depends on (``Loaded.built_from``, the
    query, the client's patients, the day), the least recently used dropped beyond ``size``. A report is taken only
    by a request whose stays were all taken as kept under the same keys (``Loaded.all_kept``), with the same rules
    object it was computed with: the rules are read from their files once per process (rules.load), so a report is
    never computed under other rules than the process's. Never trusted for a while, never told of a change: the keys
    are read from the database on every request."""

    def __init__(self, size: int = REPORTS_KEPT) -> None:
        self.size = size
        self._kept: OrderedDict[Hashable, tuple[Rules, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._kept)

    def get(self, key: Hashable, rules: Rules) -> Any | None:
        with self._lock:
            kept = self._kept.get(key)
            if kept is None or kept[0] is not rules:
                return None
            self._kept.move_to_end(key)
            return kept[1]

    def put(self, key: Hashable, rules: Rules, report: Any) -> None:
        with self._lock:
            self._kept[key] = (rules, report)
            self._kept.move_to_end(key)
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)


def stays_of(loaded: Loaded, ids: Iterable[str]) -> list[Stay]:
    wanted = set(ids)
    return [s for s in loaded.stays if s.enrollment_id in wanted]


@dataclass(frozen=True)
class Reader:
    """The outcomes' view of one store: its rules, and the stays a client may count. runtime.py builds it (with the
    transition timelines of exchange/followup.py); app.extensions["iop_fhir.outcomes"] holds it."""

    records: RecordStore
    rules_dir: Path  # mappings/outcomes: its rules are read on first use
    timelines: Timelines
    explains: Callable[[str], Iterable[str]] = stays_.project_explains
    # the stays this process built, used again while their records are unchanged (StayCache)
    cache: StayCache = field(default_factory=StayCache, compare=False, repr=False)
    # the reports this process computed over them, used again for the same stays under the same keys (ReportCache)
    reports: ReportCache = field(default_factory=ReportCache, compare=False, repr=False)

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
        period: Period | None = None,
    ) -> Loaded:
        chosen = _chosen(self.records, enrollment_id=enrollment_id, patients=patients, program=program, period=period)
        kept, all_kept = cached(self.records, self.cache, chosen, timelines=self.timelines, explains=self.explains)
        return _loaded(chosen, {eid: k.stay for eid, k in kept.items()}, kept, all_kept)
