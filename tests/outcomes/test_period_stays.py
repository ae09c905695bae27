"""The stays of a period read from the SQL store: only the enrollments whose stay can overlap the period (by the days
the store keeps on their rows, kept up to date as discharges are written, retracted and group sessions re-saved),
and yet exactly the cohort, figures and stay outcomes that reading every stay of the program gives."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import date
from typing import Any

import pytest

from iop_fhir.outcomes import load, patient, program
from iop_fhir.outcomes.program import Period
from iop_fhir.store.base import StoredRecord
from iop_fhir.store.sql import SqlStore
from tests.outcomes.test_stay_outcomes import RULES, assessment, discharge, enrollment, session

PERIOD = Period(date(2026, 1, 5), date(2026, 1, 31))
TODAY = date(2026, 3, 1)
GROUP = {
    "group_id": "G1",
    "service": "group-therapy",
    "start": "2026-01-14T18:00:00-05:00",
    "end": "2026-01-14T21:00:00-05:00",
    "modality": "in-person",
}

# enrollment id -> (admission, discharge or None), and whether the period's cohort counts it
STAYS: dict[str, tuple[str, str | None, bool]] = {
    "before-inside": ("2025-12-01", "2026-01-10", True),  # admitted before the period, discharged in it
    "still-active": ("2025-11-03", None, True),
    "inside": ("2026-01-12", "2026-01-20", True),
    "ends-on-first-day": ("2025-12-08", "2026-01-05", True),
    "admitted-on-last-day": ("2026-01-31", None, True),
    "spans": ("2025-12-15", "2026-02-20", True),
    "discharged-before": ("2025-10-06", "2025-12-20", False),
    "ended-the-day-before": ("2025-11-10", "2026-01-04", False),
    "admitted-after": ("2026-02-09", None, False),
}


def _record(kind: str, id: str, enrollment_id: str | None, content: dict[str, Any], at: int) -> StoredRecord:
    resources = [{"role": "patient", "reference": f"Patient/P-{id}"}] if kind == "enrollment" else []
    return StoredRecord(kind, id, enrollment_id, "active", 1, content, resources, at, at)


@pytest.fixture
def store(db_url: str) -> Iterator[SqlStore]:
    found = SqlStore(db_url)
    try:
        yield found
    finally:
        found.close()


def save(store: SqlStore, *records: StoredRecord) -> None:
    with store.write() as tx:
        for record in records:
            tx.save_record(record)


def program_records(store: SqlStore) -> None:
    """Each stay of STAYS with a session on its admission and on its last day, a PHQ-9 on admission, its discharge;
    one group session attended by four of them; a retracted enrollment inside the period; a discharge retracted (the
    stay reopened: counted) and a discharge corrected from before the period to inside it."""
    at = 1_000
    for eid, (admitted, discharged, _) in STAYS.items():
        at += 10
        records = [
            _record("enrollment", eid, eid, enrollment(admitted), at),
            _record("session", f"{eid}-s1", eid, {**session(admitted), "enrollment_id": eid}, at + 1),
            _record("assessment", f"{eid}-a1", eid, {**assessment(admitted, phq_9=14), "enrollment_id": eid}, at + 2),
        ]
        if discharged is not None:
            records += [
                _record("session", f"{eid}-s2", eid, {**session(discharged), "enrollment_id": eid}, at + 3),
                _record("discharge", f"{eid}-d", eid, {**discharge(discharged), "enrollment_id": eid}, at + 4),
            ]
        save(store, *records)
    attendees = ["before-inside", "still-active", "discharged-before", "admitted-after"]
    group = {**GROUP, "attendees": [{"enrollment_id": e, "attendance": "attended"} for e in attendees]}
    save(store, _record("group-session", "G1", None, group, 2_000))
    retracted = _record("enrollment", "retracted", "retracted", enrollment("2026-01-13"), 2_001)
    save(store, replace(retracted, status="entered-in-error"))
    # reopened: discharged before the period, then the discharge retracted
    save(
        store,
        _record("enrollment", "reopened", "reopened", enrollment("2025-11-17"), 2_010),
        _record("discharge", "reopened-d", "reopened", {**discharge("2025-12-05"), "enrollment_id": "reopened"}, 2_011),
    )
    gone = store.record("discharge", "reopened-d")
    assert gone is not None
    save(store, replace(gone, status="entered-in-error", updated=2_012))
    # corrected: discharged before the period, the discharge then corrected to a day in it
    save(
        store,
        _record("enrollment", "corrected", "corrected", enrollment("2025-11-24"), 2_020),
        _record(
            "discharge", "corrected-d", "corrected", {**discharge("2025-12-12"), "enrollment_id": "corrected"}, 2_021
        ),
    )
    wrong = store.record("discharge", "corrected-d")
    assert wrong is not None
    save(store, replace(wrong, content={**wrong.content, "discharge_date": "2026-01-16"}, updated=2_022))


COHORT = sorted([eid for eid, (_, _, counted) in STAYS.items() if counted] + ["reopened", "corrected"])


def no_transitions(discharges: list[StoredRecord]) -> dict[str, list[dict[str, Any]]]:
    return {}


def test_the_store_offers_exactly_the_enrollments_whose_stay_overlaps_the_period(store: SqlStore) -> None:
    program_records(store)
    found = store.enrollments_during(PERIOD.start, PERIOD.end)
    assert sorted(e.id for e in found) == COHORT


def test_a_periods_stays_give_the_cohort_figures_and_stay_outcomes_of_reading_every_stay(store: SqlStore) -> None:
    program_records(store)
    every = load.load(store, timelines=no_transitions)
    of_period = load.load(store, timelines=no_transitions, period=PERIOD)
    assert len(every.stays) == len(STAYS) + 2  # the retracted enrollment is no stay
    old = program.cohort(every.stays, PERIOD, None)
    new = program.cohort(of_period.stays, PERIOD, None)
    assert sorted(s.enrollment_id for s in new) == COHORT
    assert new == old
    assert program.outcomes(new, RULES, PERIOD, TODAY) == program.outcomes(old, RULES, PERIOD, TODAY)
    assert [patient.outcomes(s, RULES, TODAY) for s in new] == [patient.outcomes(s, RULES, TODAY) for s in old]
    assert {eid: of_period.references[eid] for eid in COHORT} == {eid: every.references[eid] for eid in COHORT}
    # the group session counts for its attendees in the period, and only for them
    grouped = {s.enrollment_id for s in new for x in s.sessions if x.group_id == "G1"}
    assert grouped == {"before-inside", "still-active"}


def test_a_group_session_re_saved_without_an_attendee_is_no_longer_read_for_that_enrollment(store: SqlStore) -> None:
    program_records(store)
    group = store.record("group-session", "G1")
    assert group is not None
    kept = [a for a in group.content["attendees"] if a["enrollment_id"] != "still-active"]
    save(store, replace(group, content={**group.content, "attendees": kept}, updated=3_000))
    assert store.group_sessions_of(["still-active"]) == []
    assert [g.id for g in store.group_sessions_of(["before-inside", "still-active"])] == ["G1"]


def test_records_of_many_enrollments_are_read_in_batches_oldest_first(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    program_records(store)
    monkeypatch.setattr("iop_fhir.store.sql.RECORDS_BATCH", 2)
    found = store.records_of(["session", "discharge"], sorted(STAYS))
    expected = [
        f"{eid}-{suffix}"
        for eid, (_, ended, _) in STAYS.items()
        for suffix in (("s1", "s2", "d") if ended else ("s1",))
    ]
    assert [r.id for r in found] == expected
