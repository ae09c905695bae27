"""The write transaction's buffered inserts (SqlWriteTx.flush): every queued row is stored as given, whether the
batch goes as an executemany or, on PostgreSQL from COPY_ROWS rows on, as a COPY; a row the database refuses rolls
back the whole write and is raised as SQLAlchemy's error."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from iop_fhir.privacy import visibility
from iop_fhir.r4 import indexing
from iop_fhir.store import schema
from iop_fhir.store.base import StoredResource, VersionFacts
from iop_fhir.store.sql import COPY_ROWS, SqlStore, SqlWriteTx

LAST_UPDATED = 1_780_000_000_000_000


def _observation(n: int) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": f"obs-{n}",
        "meta": {"versionId": "1", "lastUpdated": "2026-05-28T20:26:40Z"},
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
        "subject": {"reference": f"Patient/p{n % 3}"},
        "effectiveDateTime": f"2026-01-{1 + n % 28:02d}T08:30:00Z",
        "valueQuantity": {"value": 60 + n / 10, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
        "note": [{"text": "tab\there, quote \" backslash \\ newline\n and 'ünïcode'"}],
    }
    if n % 2:
        resource["meta"]["security"] = [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "SUD"}]
    return resource


def _save(tx: SqlWriteTx, resource: dict[str, Any]) -> None:
    res_id = resource["id"]
    index = indexing.extract(resource)
    tx.reserve("Observation", res_id)
    version = StoredResource("Observation", res_id, 1, LAST_UPDATED, False, orjson.dumps(resource), "POST")
    tx.save(version, index, visibility.facts_of(resource, index))


def _index_rows(store: SqlStore) -> set[tuple[str, tuple[tuple[str, Any], ...]]]:
    found: set[tuple[str, tuple[tuple[str, Any], ...]]] = set()
    with store.reading() as conn:
        for kind, table in schema.INDEX_TABLES.items():
            for row in conn.execute(select(table)).mappings():
                found.add((kind, tuple(sorted((str(k), v) for k, v in row.items()))))
    return found


@pytest.mark.parametrize("count", [1, 3, COPY_ROWS - 1, COPY_ROWS, 2 * COPY_ROWS + 5])
def test_every_buffered_row_is_stored_as_given(db_url: str, count: int) -> None:
    store = SqlStore(db_url)
    resources = [_observation(n) for n in range(count)]
    with store.write() as tx:
        for resource in resources:
            _save(tx, resource)
    expected_index: set[tuple[str, tuple[tuple[str, Any], ...]]] = set()
    for resource in resources:
        for kind, rows in indexing.extract(resource).items():
            for row in indexing.mark_sort_rows(kind, rows):
                full: dict[str, Any] = {c.name: None for c in schema.INDEX_TABLES[kind].c}
                full.update(res_type="Observation", res_id=resource["id"], **row)
                expected_index.add((kind, tuple(sorted(full.items()))))
    try:
        for resource in resources:
            stored = store.read("Observation", resource["id"])
            assert stored is not None and not stored.deleted
            assert stored.content == orjson.dumps(resource)
            assert (stored.version_id, stored.last_updated) == (1, LAST_UPDATED)
        with store.reading() as conn:
            history = conn.execute(select(schema.history.c.res_id, schema.history.c.method, schema.history.c.protected))
            assert sorted(history) == sorted((r["id"], "POST", "security" in r["meta"]) for r in resources)
            patients = conn.execute(select(schema.version_patients.c.res_id, schema.version_patients.c.patient_id))
            assert sorted(patients) == sorted((r["id"], r["subject"]["reference"][8:]) for r in resources)
        assert _index_rows(store) == expected_index
    finally:
        store.close()


def test_index_rows_of_one_table_with_different_columns_are_all_stored(db_url: str) -> None:
    store = SqlStore(db_url)
    tokens: list[dict[str, Any]] = [
        {"param": "code", "system": "http://loinc.org", "code": "8867-4", "text": "heart rate"},
        {"param": "status", "code": "final"},  # no system and no text: the columns' defaults (null)
        {"param": "category", "system": "http://x", "code": "vital-signs", "text": None},
    ]
    with store.write() as tx:
        for n in range(COPY_ROWS):
            tx.reserve("Observation", f"obs-{n}")
            version = StoredResource("Observation", f"obs-{n}", 1, LAST_UPDATED, False, b"{}", "POST")
            tx.save(version, {"token": tokens}, VersionFacts())
    try:
        with store.reading() as conn:
            t = schema.idx_token.c
            rows = conn.execute(
                select(t.param, t.system, t.code, t.text, func.count()).group_by(t.param, t.system, t.code, t.text)
            ).all()
        assert sorted(rows) == [
            ("category", "http://x", "vital-signs", None, COPY_ROWS),
            ("code", "http://loinc.org", "8867-4", "heart rate", COPY_ROWS),
            ("status", None, "final", None, COPY_ROWS),
        ]
    finally:
        store.close()


@pytest.mark.parametrize("count", [2, 2 * COPY_ROWS])
def test_a_row_the_database_refuses_rolls_back_the_whole_write(db_url: str, count: int) -> None:
    store = SqlStore(db_url)
    with store.write() as tx:
        _save(tx, _observation(0))
    try:
        with pytest.raises(IntegrityError), store.write() as tx:
            for n in range(1, count):
                _save(tx, _observation(n))
            _save(tx, _observation(0))  # declared new, but its primary key is taken: refused at the flush
        assert store.read("Observation", "obs-1") is None
        with store.reading() as conn:
            assert conn.execute(select(func.count()).select_from(schema.resources)).scalar_one() == 1
            assert conn.execute(select(func.count()).select_from(schema.history)).scalar_one() == 1
            assert conn.execute(select(func.count()).select_from(schema.idx_token)).scalar_one() == len(
                indexing.extract(_observation(0))["token"]
            )
    finally:
        store.close()
