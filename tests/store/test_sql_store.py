"""The SQL store's own paths that the API tests do not reach."""

from __future__ import annotations

from iop_fhir.store.base import StoredResource
from iop_fhir.store.schema import metadata
from iop_fhir.store.sql import SqlStore


def test_in_memory_database_reads_and_vreads_through_its_single_connection() -> None:
    store = SqlStore("sqlite://")
    metadata.create_all(store.engine)
    version = StoredResource("Patient", "p1", 1, 1_000_000, False, b'{"resourceType":"Patient","id":"p1"}', "POST")
    with store.write() as tx:
        assert tx.current("Patient", "p1") is None
        tx.save(version, {"token": [{"param": "gender", "system": None, "code": "other", "text": None}]})
    assert store.read("Patient", "p1") == StoredResource("Patient", "p1", 1, 1_000_000, False, version.content)
    assert store.vread("Patient", "p1", 1) == version
    assert store.read("Patient", "p2") is None
    assert store.vread("Patient", "p1", 2) is None
    store.close()
