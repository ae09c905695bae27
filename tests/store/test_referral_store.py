"""Inbound referrals in the SQL store (table inbound_referrals): round trip as a StoredRecord of kind referral,
replacement, listing by status, one transaction with the FHIR resources, locking, and nothing of them in iop_records."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import func, select

from iop_fhir.store import schema
from iop_fhir.store.base import REFERRAL, StoredRecord, StoredResource, VersionFacts
from iop_fhir.store.sql import SqlStore

RESOURCES = [
    {"role": "task", "reference": "Task/t1"},
    {"role": "service-request", "reference": "ServiceRequest/sr1"},
    {"role": "patient", "reference": "Patient/p1"},
]


def _referral(id: str = "t1", *, status: str = "requested", created: int = 1_000, **content: Any) -> StoredRecord:
    return StoredRecord(
        kind=REFERRAL,
        id=id,
        enrollment_id=None,
        status="active",
        version=1,
        content={
            "status": status,
            "patient": {"name": {"given": ["Ana"], "family": "Reyes"}},
            "referring": {"organization": "St. Barnabas Inpatient Unit", "partner": None},
            "service_request": "ServiceRequest/sr1",
            "task": f"Task/{id}",
            "duplicate_tasks": [],
            **content,
        },
        resources=RESOURCES,
        created=created,
        updated=created,
    )


@pytest.fixture
def store(db_url: str) -> Iterator[SqlStore]:
    store = SqlStore(db_url)
    yield store
    store.close()


def test_a_saved_referral_reads_back_as_a_referral_record_with_content_and_resources_decoded(store: SqlStore) -> None:
    with store.write() as tx:
        assert tx.referral("t1") is None
        tx.save_referral(_referral())
        assert tx.referral("t1") == _referral()
        assert tx.referral("t1", lock=False) == _referral()
    assert store.referral("t1") == _referral()
    assert store.referral("t2") is None
    assert store.record(REFERRAL, "t1") is None
    with store.reading() as conn:
        assert conn.execute(select(func.count()).select_from(schema.iop_records)).scalar_one() == 0
        row = conn.execute(select(schema.inbound_referrals)).one()
    assert (row.id, row.status, row.record_status, row.version) == ("t1", "requested", "active", 1)


def test_saving_a_decision_replaces_the_referral_and_its_status_column(store: SqlStore) -> None:
    with store.write() as tx:
        tx.save_referral(_referral())
    admitted = replace(
        _referral(status="admitted", enrollment_id="e1", episode_of_care="EpisodeOfCare/e1-episode"),
        enrollment_id="e1",
        version=3,
        updated=5_000,
    )
    with store.write() as tx:
        tx.save_referral(admitted)
    assert store.referral("t1") == admitted
    assert store.referrals() == ([admitted], 1)
    assert store.referrals(status="requested") == ([], 0)
    assert store.referrals(status="admitted") == ([admitted], 1)


def test_referrals_are_listed_by_creation_time_then_id_with_the_total_of_their_status(store: SqlStore) -> None:
    with store.write() as tx:
        tx.save_referral(_referral("c", created=3_000))
        tx.save_referral(_referral("b", created=1_000, status="declined"))
        tx.save_referral(_referral("a", created=3_000))
        tx.save_referral(_referral("d", created=2_000))
    page, total = store.referrals(offset=1, count=2)
    assert [r.id for r in page] == ["d", "a"]
    assert total == 4
    assert [r.id for r in store.referrals(count=100)[0]] == ["b", "d", "a", "c"]
    requested, total = store.referrals(status="requested", offset=1, count=1)
    assert ([r.id for r in requested], total) == (["a"], 3)
    assert [r.id for r in store.referrals(status="declined")[0]] == ["b"]
    assert store.referrals(offset=10) == ([], 4)
    assert store.referrals(status="requested", count=0) == ([], 3)


def test_a_referral_commits_or_rolls_back_with_the_task_of_its_transaction(store: SqlStore) -> None:
    task = StoredResource("Task", "t1", 1, 1_000, False, b'{"resourceType":"Task"}', "POST")
    with pytest.raises(RuntimeError), store.write() as tx:
        tx.current("Task", "t1")
        tx.save(task, {}, VersionFacts())
        tx.save_referral(_referral())
        raise RuntimeError("a later write hook failed")
    assert store.referral("t1") is None
    assert store.read("Task", "t1") is None


def test_concurrent_read_then_write_of_one_referral_loses_no_update(store: SqlStore) -> None:
    with store.write() as tx:
        tx.save_referral(_referral())

    def add_duplicate(number: int) -> None:
        with store.write() as tx:
            current = tx.referral("t1")
            assert current is not None
            content = {**current.content, "duplicate_tasks": [*current.content["duplicate_tasks"], f"Task/d{number}"]}
            tx.save_referral(replace(current, content=content, version=current.version + 1))

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(add_duplicate, range(24)))
    stored = store.referral("t1")
    assert stored is not None
    assert stored.version == 25
    assert sorted(stored.content["duplicate_tasks"]) == sorted(f"Task/d{n}" for n in range(24))


def test_only_a_record_of_kind_referral_is_saved_as_a_referral(store: SqlStore) -> None:
    with pytest.raises(ValueError), store.write() as tx:
        tx.save_referral(replace(_referral(), kind="discharge"))
    assert store.referral("t1") is None


def test_ids_no_referral_can_have_read_as_absent(store: SqlStore) -> None:
    # PostgreSQL cannot even compare a text key with NUL in it; no stored referral has such an id.
    assert store.referral("t\x001") is None
