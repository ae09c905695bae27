"""The Alembic migrations create exactly the schema that iop_fhir/store/schema.py describes, and move the rows whose
home a revision changes."""

from __future__ import annotations

from typing import Any

import orjson
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Column, Engine, MetaData, Table, create_engine, insert, inspect, select

from iop_fhir.store import migrate, schema
from tests.store.migrating import migrate_to


def test_migrated_schema_matches_the_table_definitions(db_url: str) -> None:
    engine = create_engine(db_url)
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), schema.metadata)
    engine.dispose()
    assert differences == []


def test_upgrade_is_idempotent(db_url: str) -> None:
    engine = create_engine(db_url)
    migrate.upgrade(engine)
    migrate.upgrade(engine)
    assert not migrate.is_empty(engine)
    engine.dispose()


# -- 0008: inbound referrals and Subscription event counters leave iop_records

REFERRAL_ROWS = [
    {
        "kind": "referral",
        "id": "t1",
        "enrollment_id": None,
        "status": "active",
        "version": 2,
        "content": orjson.dumps({"status": "accepted", "task": "Task/t1", "planned_admission": "2027-01-12"}),
        "resources": orjson.dumps([{"role": "task", "reference": "Task/t1"}]),
        "created": 1_000,
        "updated": 2_000,
    },
    {
        "kind": "referral",
        "id": "t2",
        "enrollment_id": "e2",
        "status": "active",
        "version": 3,
        "content": orjson.dumps({"status": "admitted", "task": "Task/t2", "enrollment_id": "e2"}),
        "resources": orjson.dumps([{"role": "task", "reference": "Task/t2"}]),
        "created": 1_500,
        "updated": 3_000,
    },
]
# A counter record's version was its count; the downgrade cannot know when it was created and takes its last update.
COUNTER_ROW = {
    "kind": "subscription-events",
    "id": "labs",
    "enrollment_id": None,
    "status": "active",
    "version": 3,
    "content": orjson.dumps({"events": 3}),
    "resources": orjson.dumps([]),
    "created": 4_000,
    "updated": 4_000,
}
ENROLLMENT_ROW = {
    "kind": "enrollment",
    "id": "e2",
    "enrollment_id": "e2",
    "status": "active",
    "version": 1,
    "content": orjson.dumps({"program": "iop-adult"}),
    "resources": orjson.dumps([]),
    "created": 2_500,
    "updated": 2_500,
}


def _rows(engine: Engine, table: Table, *order: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(table).order_by(*(table.c[name] for name in order))).mappings().all()
    return [{k: bytes(v) if isinstance(v, memoryview) else v for k, v in row.items()} for row in rows]


def test_0008_moves_referrals_and_event_counters_into_their_tables_and_the_downgrade_moves_them_back(
    unmigrated_url: str,
) -> None:
    engine = create_engine(unmigrated_url)
    try:
        migrate_to(engine, "0007")
        with engine.begin() as conn:
            conn.execute(insert(schema.iop_records), [*REFERRAL_ROWS, COUNTER_ROW, ENROLLMENT_ROW])

        migrate_to(engine, "0008")

        assert _rows(engine, schema.iop_records, "kind", "id") == [ENROLLMENT_ROW]
        assert _rows(engine, schema.inbound_referrals, "id") == [
            {
                "id": row["id"],
                "status": orjson.loads(row["content"])["status"],
                "record_status": row["status"],
                "enrollment_id": row["enrollment_id"],
                "version": row["version"],
                "content": row["content"],
                "resources": row["resources"],
                "created": row["created"],
                "updated": row["updated"],
            }
            for row in REFERRAL_ROWS
        ]
        counters = _rows(engine, schema.subscription_events, "sub_id")
        assert counters == [{"sub_id": "labs", "events": 3, "updated": 4_000}]

        migrate_to(engine, "0007", down=True)

        assert _rows(engine, schema.iop_records, "kind", "id") == [ENROLLMENT_ROW, *REFERRAL_ROWS, COUNTER_ROW]
        tables = inspect(engine).get_table_names()
        assert "inbound_referrals" not in tables and "subscription_events" not in tables
    finally:
        engine.dispose()


# -- 0009: what each version disclosed is kept beside it

_HISTORY_0008 = Table(
    "resource_history",
    MetaData(),
    *(Column(c.name, c.type) for c in schema.history.columns if c.name not in ("protected", "note")),
)
_PART2 = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "42CFRPart2"}


def _version(res_id: str, version: int, content: dict[str, Any] | None) -> dict[str, Any]:
    body = orjson.dumps({"resourceType": "Observation", "id": res_id, **content}) if content is not None else None
    return {
        "res_type": "Observation",
        "res_id": res_id,
        "version_id": version,
        "last_updated": version * 1_000,
        "method": "DELETE" if content is None else "PUT",
        "content": body,
    }


def test_0009_fills_in_the_patients_and_labels_of_every_stored_version_and_a_deletion_keeps_those_it_deleted(
    unmigrated_url: str,
) -> None:
    engine = create_engine(unmigrated_url)
    labelled = {"meta": {"security": [_PART2]}, "status": "final", "code": {"text": "x"}}
    try:
        migrate_to(engine, "0008")
        with engine.begin() as conn:
            conn.execute(
                insert(_HISTORY_0008),
                [
                    _version("moved", 1, {**labelled, "subject": {"reference": "Patient/b"}}),
                    _version("moved", 2, {**labelled, "subject": {"reference": "Patient/a"}}),
                    _version("gone", 1, {**labelled, "subject": {"reference": "Patient/c"}}),
                    _version("gone", 2, None),
                    _version(
                        "elsewhere", 1, {"status": "final", "code": {"text": "x"}, "subject": {"reference": "x/y"}}
                    ),
                ],
            )

        migrate_to(engine, "0009")

        patients = _rows(engine, schema.version_patients, "res_id", "version_id")
        assert [(p["res_id"], p["version_id"], p["patient_id"]) for p in patients] == [
            ("gone", 1, "c"),
            ("gone", 2, "c"),
            ("moved", 1, "b"),
            ("moved", 2, "a"),
        ]
        flags = [
            (h["res_id"], h["version_id"], h["protected"], h["note"])
            for h in _rows(engine, schema.history, "res_id", "version_id")
        ]
        assert flags == [
            ("elsewhere", 1, False, False),
            ("gone", 1, True, False),
            ("gone", 2, True, False),
            ("moved", 1, True, False),
            ("moved", 2, True, False),
        ]
    finally:
        engine.dispose()
