"""The versions of many resources read at once (SqlStore.histories): each resource's as its own history gives them."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest

from iop_fhir.store.base import StoredResource, VersionFacts
from iop_fhir.store.sql import SqlStore


@pytest.fixture
def store(db_url: str) -> Iterator[SqlStore]:
    store = SqlStore(db_url)
    yield store
    store.close()


def _save(store: SqlStore, res_type: str, res_id: str, last_updated: int, status: str) -> None:
    with store.write() as tx:
        current = tx.current(res_type, res_id)
        version_id = 1 if current is None else current.version_id + 1
        content = orjson.dumps({"resourceType": res_type, "id": res_id, "status": status})
        method = "POST" if current is None else "PUT"
        tx.save(StoredResource(res_type, res_id, version_id, last_updated, False, content, method), {}, VersionFacts())


def _delete(store: SqlStore, res_type: str, res_id: str, last_updated: int) -> None:
    with store.write() as tx:
        current = tx.current(res_type, res_id)
        assert current is not None
        tx.delete(res_type, res_id, current.version_id + 1, last_updated)


def test_histories_of_many_resources_equal_each_ones_history_newest_first(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for at, status in ((1_000, "requested"), (2_000, "accepted"), (3_000, "completed")):
        _save(store, "Task", "t0", at, status)
    _save(store, "Task", "t1", 1_500, "requested")
    _save(store, "Task", "t2", 1_100, "requested")
    _delete(store, "Task", "t2", 1_200)
    _save(store, "Task", "t3", 5_000, "requested")
    _save(store, "Task", "t3", 5_000, "accepted")  # the same instant: the later version first
    _save(store, "ServiceRequest", "t0", 4_000, "active")  # another type with the same id is not read
    monkeypatch.setattr("iop_fhir.store.sql.RECORDS_BATCH", 2)  # three batches
    found = store.histories("Task", ["t3", "t0", "missing", "t1", "t2", "t0"])
    assert set(found) == {"t0", "t1", "t2", "t3"}
    for res_id, versions in found.items():
        own, _ = store.history("Task", res_id, since=None, at=None, count=1000, offset=0)
        assert versions == own
    assert [v.version_id for v in found["t0"]] == [3, 2, 1]
    assert [v.version_id for v in found["t3"]] == [2, 1]
    assert [(v.version_id, v.deleted, v.method) for v in found["t2"]] == [(2, True, "DELETE"), (1, False, "POST")]
    assert store.histories("Task", []) == {}
