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


# iop_records before 0014 added the days a stay is found by
_RECORDS_0013 = Table(
    "iop_records",
    MetaData(),
    *(Column(c.name, c.type) for c in schema.iop_records.columns if c.name not in ("record_day", "stay_end")),
)


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
            conn.execute(insert(_RECORDS_0013), [*REFERRAL_ROWS, COUNTER_ROW, ENROLLMENT_ROW])

        migrate_to(engine, "0008")

        assert _rows(engine, _RECORDS_0013, "kind", "id") == [ENROLLMENT_ROW]
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

        assert _rows(engine, _RECORDS_0013, "kind", "id") == [ENROLLMENT_ROW, *REFERRAL_ROWS, COUNTER_ROW]
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
            ("elsewhere", 1, None),  # a subject that names no local resource may be a Patient: an unknown one
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


# -- 0013: the visibility of the current version on the resource's row

_RESOURCES_0012 = Table(
    "resources",
    MetaData(),
    *(Column(c.name, c.type) for c in schema.resources.columns if c.name not in ("owner", "protected", "note")),
)


def test_0013_gives_each_row_the_owner_and_labels_of_its_current_version_not_of_an_earlier_one(
    unmigrated_url: str,
) -> None:
    # (res_id, current version, deleted, {version: (patients, protected, note)})
    stored: list[tuple[str, int, bool, dict[int, tuple[list[str | None], bool, bool]]]] = [
        ("moved", 2, False, {1: (["b"], False, False), 2: (["a"], True, False)}),
        ("unlabelled-now", 2, False, {1: (["a"], True, True), 2: (["a"], False, False)}),
        ("two", 1, False, {1: (["a", "b"], True, False)}),
        ("unnamed", 1, False, {1: ([None], False, False)}),
        ("nobody", 1, False, {1: ([], True, False)}),
        ("free", 1, False, {1: ([], False, False)}),
        ("note", 1, False, {1: (["a"], True, True)}),
        ("gone", 2, True, {1: (["c"], True, False), 2: (["c"], True, False)}),
    ]
    engine = create_engine(unmigrated_url)
    try:
        migrate_to(engine, "0012")
        with engine.begin() as conn:
            for res_id, current, deleted, versions in stored:
                conn.execute(
                    insert(_RESOURCES_0012).values(
                        res_type="Observation",
                        res_id=res_id,
                        version_id=current,
                        last_updated=current * 1_000,
                        deleted=deleted,
                        content=None if deleted else b"{}",
                    )
                )
                for version, (patients, protected, note) in versions.items():
                    conn.execute(
                        insert(schema.history).values(
                            **_version(res_id, version, None if deleted and version == current else {}),
                            protected=protected,
                            note=note,
                        )
                    )
                    for patient in patients:
                        conn.execute(
                            insert(schema.version_patients).values(
                                res_type="Observation", res_id=res_id, version_id=version, patient_id=patient
                            )
                        )

        migrate_to(engine, "0013")

        rows = {r["res_id"]: (r["owner"], r["protected"], r["note"]) for r in _rows(engine, schema.resources, "res_id")}
        assert rows == {
            "moved": ("a", True, False),
            "unlabelled-now": ("a", False, False),
            "two": ("*", True, False),
            "unnamed": ("*", False, False),
            "nobody": (None, True, False),
            "free": (None, False, False),
            "note": ("a", True, True),
            "gone": ("c", True, False),
        }
        indexes = {i["name"] for i in inspect(engine).get_indexes("resources")}
        assert "ix_resources_owner" in indexes

        migrate_to(engine, "0012", down=True)

        assert {c["name"] for c in inspect(engine).get_columns("resources")} == {c.name for c in _RESOURCES_0012.c}
    finally:
        engine.dispose()


# -- 0014: the days a stay is found by, and the attendees of each group session


def _record_row(kind: str, id: str, enrollment_id: str | None, content: dict[str, Any], **more: Any) -> dict[str, Any]:
    row = {
        "kind": kind,
        "id": id,
        "enrollment_id": enrollment_id,
        "status": "active",
        "version": 1,
        "content": orjson.dumps(content),
        "resources": orjson.dumps([]),
        "created": 1_000,
        "updated": 1_000,
    }
    return {**row, **more}


def test_0014_dates_enrollments_and_discharges_ends_each_stay_with_its_latest_active_discharge_and_lists_attendees(
    unmigrated_url: str,
) -> None:
    engine = create_engine(unmigrated_url)
    try:
        migrate_to(engine, "0013")
        with engine.begin() as conn:
            conn.execute(
                insert(_RECORDS_0013),
                [
                    _record_row("enrollment", "open", "open", {"admission_date": "2026-01-05"}),
                    _record_row("enrollment", "ended", "ended", {"admission_date": "2026-01-06"}),
                    _record_row("enrollment", "unreadable", "unreadable", {"admission_date": "soon"}),
                    # of "ended": the latest updated active discharge ends it, not a retracted or an older one
                    _record_row("discharge", "d-old", "ended", {"discharge_date": "2026-02-01"}, updated=2_000),
                    _record_row("discharge", "d-new", "ended", {"discharge_date": "2026-02-20"}, updated=3_000),
                    _record_row(
                        "discharge", "d-retracted", "ended", {"discharge_date": "2026-03-01"}, status="entered-in-error"
                    ),
                    _record_row("discharge", "d-retracted-only", "open", {"discharge_date": "2026-01-09"}),
                    _record_row(
                        "group-session",
                        "g1",
                        None,
                        {
                            "attendees": [
                                {"enrollment_id": "open"},
                                {"enrollment_id": "ended"},
                                {"enrollment_id": "open"},
                            ]
                        },
                    ),
                    _record_row("session", "s1", "open", {"start": "2026-01-07T18:00:00-05:00"}),
                ],
            )
            conn.execute(
                _RECORDS_0013.update().where(_RECORDS_0013.c.id == "d-retracted-only").values(status="entered-in-error")
            )

        migrate_to(engine, "0014")

        rows = {(r["kind"], r["id"]): (r["record_day"], r["stay_end"]) for r in _rows(engine, schema.iop_records, "id")}
        assert rows == {
            ("enrollment", "open"): ("2026-01-05", None),
            ("enrollment", "ended"): ("2026-01-06", "2026-02-20"),
            ("enrollment", "unreadable"): (None, None),
            ("discharge", "d-old"): ("2026-02-01", None),
            ("discharge", "d-new"): ("2026-02-20", None),
            ("discharge", "d-retracted"): ("2026-03-01", None),
            ("discharge", "d-retracted-only"): ("2026-01-09", None),
            ("group-session", "g1"): (None, None),
            ("session", "s1"): (None, None),
        }
        attendees = [
            (r["group_id"], r["enrollment_id"]) for r in _rows(engine, schema.group_attendees, "enrollment_id")
        ]
        assert attendees == [("g1", "ended"), ("g1", "open")]

        migrate_to(engine, "0013", down=True)

        assert {c["name"] for c in inspect(engine).get_columns("iop_records")} == {c.name for c in _RECORDS_0013.c}
        assert "group_attendees" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_0017_keeps_per_value_counts_for_a_thousand_reference_targets_on_postgresql(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            found = conn.exec_driver_sql(
                "SELECT attstattarget FROM pg_attribute"
                " WHERE attrelid = 'idx_reference'::regclass AND attname = 'target_id'"
            ).scalar_one()
        assert found == 1000
    finally:
        engine.dispose()


# -- 0018: a version that refers to a Patient by no local id belongs to an unknown Patient

_NAMING_B = {"url": "https://example.org/fhir/witness", "valueReference": {"reference": "Patient/b"}}
_BY_IDENTIFIER = {"identifier": {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "000-00-0001"}}


def test_0018_gives_every_version_the_patients_it_names_anywhere_or_by_no_local_id_and_the_current_row_its_owner(
    unmigrated_url: str,
) -> None:
    body = {"status": "final", "code": {"text": "x"}}
    # (res_id, current version, deleted, {version: (content, patients kept before 0018)})
    stored: list[tuple[str, int, bool, dict[int, tuple[dict[str, Any] | None, list[str | None]]]]] = [
        ("by-identifier", 1, False, {1: ({**body, "subject": _BY_IDENTIFIER}, [])}),
        (
            "beside-a",
            1,
            False,
            {1: ({**body, "subject": {"reference": "Patient/a"}, "performer": [_BY_IDENTIFIER]}, ["a"])},
        ),
        (
            "was-by-identifier",
            2,
            False,
            {1: ({**body, "subject": _BY_IDENTIFIER}, []), 2: ({**body, "subject": {"reference": "Patient/a"}}, ["a"])},
        ),
        ("deleted", 2, True, {1: ({**body, "subject": {"reference": "urn:uuid:1"}}, []), 2: (None, [])}),
        ("already", 1, False, {1: ({**body, "subject": {"reference": "Patient?identifier=x|1"}}, [None])}),
        ("of-a", 1, False, {1: ({**body, "subject": {"reference": "Patient/a", "display": "A"}}, ["a"])}),
        ("by-display", 1, False, {1: ({**body, "performer": [{"display": "Dr. Example"}]}, [])}),
        (
            "names-b-too",
            1,
            False,
            {1: ({**body, "subject": {"reference": "Patient/a"}, "extension": [_NAMING_B]}, ["a"])},
        ),
        ("names-only-b", 1, False, {1: ({**body, "extension": [_NAMING_B]}, [])}),
    ]
    engine = create_engine(unmigrated_url)
    try:
        migrate_to(engine, "0017")
        with engine.begin() as conn:
            for res_id, current, deleted, versions in stored:
                owners = versions[current][1]
                conn.execute(
                    insert(schema.resources).values(
                        res_type="Observation",
                        res_id=res_id,
                        version_id=current,
                        last_updated=current * 1_000,
                        deleted=deleted,
                        content=None if deleted else b"{}",
                        owner=(owners[0] if len(owners) == 1 and owners[0] else "*") if owners else None,
                    )
                )
                for version, (content, patients) in versions.items():
                    conn.execute(insert(schema.history).values(**_version(res_id, version, content)))
                    for patient in patients:
                        conn.execute(
                            insert(schema.version_patients).values(
                                res_type="Observation", res_id=res_id, version_id=version, patient_id=patient
                            )
                        )

        migrate_to(engine, "0018")

        patients = _rows(engine, schema.version_patients, "res_id", "version_id", "patient_id")
        found: dict[tuple[str, int], list[str | None]] = {}
        for row in patients:
            found.setdefault((row["res_id"], row["version_id"]), []).append(row["patient_id"])
        assert {key: sorted(p, key=lambda x: x or "") for key, p in found.items()} == {
            ("by-identifier", 1): [None],
            ("beside-a", 1): [None, "a"],
            ("was-by-identifier", 1): [None],
            ("was-by-identifier", 2): ["a"],
            ("deleted", 1): [None],
            ("deleted", 2): [None],
            ("already", 1): [None],
            ("of-a", 1): ["a"],
            ("names-b-too", 1): ["a", "b"],
            ("names-only-b", 1): ["b"],
        }
        owners = {r["res_id"]: r["owner"] for r in _rows(engine, schema.resources, "res_id")}
        assert owners == {
            "by-identifier": "*",
            "beside-a": "*",
            "was-by-identifier": "a",
            "deleted": "*",
            "already": "*",
            "of-a": "a",
            "by-display": None,
            "names-b-too": "*",
            "names-only-b": "b",
        }
    finally:
        engine.dispose()
