"""IOP records in the SQL store: round trip, replacement, listing, one transaction with the FHIR resources, locking."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from iop_fhir.store.base import StoredRecord, StoredResource, VersionFacts
from iop_fhir.store.sql import SqlStore

CONTENT = {
    "enrollment_id": "e1",
    "service": "group-therapy",
    "start": "2026-01-07T18:00:00-05:00",
    "craving_score": 4,
    "drug_screen": {"results": [{"analyte": "opiates", "result": "negative"}]},
}
RESOURCES = [
    {"role": "encounter", "reference": "Encounter/s1-encounter"},
    {"role": "craving", "reference": "Observation/s1-craving"},
]


def _record(
    kind: str = "session", id: str = "s1", *, enrollment_id: str | None = "e1", created: int = 1_000
) -> StoredRecord:
    return StoredRecord(
        kind=kind,
        id=id,
        enrollment_id=enrollment_id,
        status="active",
        version=1,
        content=CONTENT,
        resources=RESOURCES,
        created=created,
        updated=created,
    )


@pytest.fixture
def store(db_url: str) -> Iterator[SqlStore]:
    store = SqlStore(db_url)
    yield store
    store.close()


def test_saved_record_reads_back_with_content_and_resources_decoded(store: SqlStore) -> None:
    with store.write() as tx:
        assert tx.record("session", "s1") is None
        tx.save_record(_record())
        assert tx.record("session", "s1") == _record()
    assert store.record("session", "s1") == _record()
    assert store.record("session", "s2") is None
    assert store.record("assessment", "s1") is None


def test_saving_an_existing_record_replaces_it(store: SqlStore) -> None:
    with store.write() as tx:
        tx.save_record(_record())
    retracted = replace(_record(), status="entered-in-error", version=2, content={"a": 1}, resources=[], updated=2_000)
    with store.write() as tx:
        tx.save_record(retracted)
    assert store.record("session", "s1") == retracted
    assert store.records("session") == ([retracted], 1)


def test_records_are_listed_by_creation_time_then_id_with_the_total(store: SqlStore) -> None:
    with store.write() as tx:
        tx.save_record(_record(id="c", created=3_000))
        tx.save_record(_record(id="b", created=1_000))
        tx.save_record(_record(id="a", created=3_000))
        tx.save_record(_record(id="d", created=2_000))
    page, total = store.records("session", offset=1, count=2)
    assert [r.id for r in page] == ["d", "a"]
    assert total == 4
    assert [r.id for r in store.records("session", count=100)[0]] == ["b", "d", "a", "c"]
    assert store.records("session", offset=10) == ([], 4)
    assert store.records("session", count=0) == ([], 4)


def test_records_are_listed_per_kind_and_per_enrollment(store: SqlStore) -> None:
    with store.write() as tx:
        tx.save_record(_record(id="s1", enrollment_id="e1", created=1))
        tx.save_record(_record(id="s2", enrollment_id="e2", created=2))
        tx.save_record(_record(id="s3", enrollment_id="e1", created=3))
        tx.save_record(_record(kind="assessment", id="a1", enrollment_id="e1", created=4))
        tx.save_record(_record(kind="partner", id="p1", enrollment_id=None, created=5))
    sessions, total = store.records("session", enrollment_id="e1")
    assert [r.id for r in sessions] == ["s1", "s3"]
    assert total == 2
    assert [r.id for r in store.records("assessment")[0]] == ["a1"]
    assert store.records("partner")[0][0].enrollment_id is None
    assert store.records("session", enrollment_id="unknown") == ([], 0)


def test_a_record_commits_or_rolls_back_with_the_fhir_resources_of_its_transaction(store: SqlStore) -> None:
    encounter = StoredResource("Encounter", "s1-encounter", 1, 1_000, False, b'{"resourceType":"Encounter"}', "PUT")
    with pytest.raises(RuntimeError), store.write() as tx:
        tx.current("Encounter", "s1-encounter")
        tx.save(encounter, {}, VersionFacts())
        tx.save_record(_record())
        raise RuntimeError("mapping failed after the writes")
    assert store.record("session", "s1") is None
    assert store.read("Encounter", "s1-encounter") is None

    with store.write() as tx:
        tx.current("Encounter", "s1-encounter")
        tx.save(encounter, {}, VersionFacts())
        tx.save_record(_record())
    assert store.record("session", "s1") == _record()
    assert store.read("Encounter", "s1-encounter") is not None


def test_concurrent_read_then_write_of_one_record_loses_no_update(store: SqlStore) -> None:
    def bump(_: int) -> None:
        with store.write() as tx:
            current = tx.record("partner", "p1")
            if current is None:
                tx.save_record(_record(kind="partner", id="p1", enrollment_id=None))
            else:
                tx.save_record(replace(current, version=current.version + 1))

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(bump, range(24)))
    stored = store.record("partner", "p1")
    assert stored is not None
    assert stored.version == 24


def test_ids_no_record_can_have_read_as_absent(store: SqlStore) -> None:
    # PostgreSQL cannot even compare a text key with NUL in it; no stored record has such an id.
    assert store.record("session", "s\x001") is None
    assert store.records("session", enrollment_id="e\x001") == ([], 0)
