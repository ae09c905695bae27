"""Migration 0010 moves the AuditEvent resources stored (and indexed) before it into the audit log, under their own
ids, and leaves no AuditEvent in the resources, their history, the version patients or the search index; the other
resources stay as they were. On SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import Engine, create_engine, func, insert, select

from iop_fhir.privacy import audit
from iop_fhir.r4 import indexing
from iop_fhir.r4.indexing import date_range
from iop_fhir.store import schema
from iop_fhir.store.base import AuditQuery, AuditRow
from iop_fhir.store.sql import SqlStore
from tests.store.migrating import migrate_to

WHEN = "2026-05-01T14:03:22.123456Z"
PARTNER = "Organization/passaic-valley-recovery"
QUERY = "/fhir/Observation?subject=Patient/p1&code=8867-4"


def _store(engine: Engine, res_type: str, res_id: str, resource: dict[str, Any], *, versions: int = 1) -> None:
    """A resource as the store kept it at revision 0009: current row, every version, its search index rows."""
    content = orjson.dumps({**resource, "id": res_id})
    with engine.begin() as conn:
        conn.execute(
            insert(schema.resources),
            {"res_type": res_type, "res_id": res_id, "version_id": versions, "last_updated": 5, "deleted": False,
             "content": content},
        )  # fmt: skip
        for version in range(1, versions + 1):
            conn.execute(
                insert(schema.history),
                {"res_type": res_type, "res_id": res_id, "version_id": version, "last_updated": version,
                 "method": "POST" if version == 1 else "PUT", "content": content},
            )  # fmt: skip
        conn.execute(
            insert(schema.version_patients),
            {"res_type": res_type, "res_id": res_id, "version_id": versions, "patient_id": "p1"},
        )
        for kind, rows in indexing.extract({**resource, "id": res_id}).items():
            for row in rows:
                conn.execute(insert(schema.INDEX_TABLES[kind]), {"res_type": res_type, "res_id": res_id, **row})


def _count(engine: Engine, table: Any, res_type: str) -> int:
    with engine.connect() as conn:
        found: int = conn.execute(select(func.count()).where(table.c.res_type == res_type)).scalar_one()
    return found


def test_0010_moves_audit_events_into_the_audit_log_and_out_of_the_resources(unmigrated_url: str) -> None:
    engine = create_engine(unmigrated_url)
    try:
        migrate_to(engine, "0009")
        partner_read = audit.audit_event(
            "search",
            "0",
            {"client_id": "peer-app", "partner": PARTNER, "purpose": "TREAT"},
            "Patient/p1",
            ["Observation/o1", "Observation/o2"],
            when=WHEN,
            query=QUERY,
        )
        write = audit.audit_event("create", "0", {"client_id": "emr"}, None, ["Patient/p1", "Patient/p2"], when=WHEN)
        refused = audit.audit_event("read", "4", {"client_id": "emr"}, None, ["CarePlan/x"], when=WHEN)
        export = audit.audit_event("export", "0", {"client_id": "emr"}, "Patient/p2", ["Encounter/e1"], when=WHEN)
        delivered = audit.audit_event(
            "disclose", "0", {"client_id": "iop-fhir-worker", "partner": PARTNER, "purpose": "TREAT"}, "Patient/p1",
            ["CarePlan/c1"], when="2026-05-02T09:00:00+02:00",
        )  # fmt: skip
        foreign = {"resourceType": "AuditEvent", "type": {"code": "x"}, "action": "U", "recorded": WHEN,
                   "agent": [{"requestor": True, "who": {"display": "someone"}}]}  # fmt: skip
        events = {"a1": partner_read, "a2": write, "a3": refused, "a4": export, "a5": delivered, "a6": foreign}
        for res_id, event in events.items():
            _store(engine, "AuditEvent", res_id, event, versions=2 if res_id == "a1" else 1)
        patient = {"resourceType": "Patient", "name": [{"family": "Stays"}]}
        _store(engine, "Patient", "p1", patient)
        before = {t.name: _count(engine, t, "Patient") for t in (schema.resources, schema.history)}

        migrate_to(engine, "0010")

        store = SqlStore(unmigrated_url)
        try:
            rows, total = store.audit_rows(AuditQuery(count=100, total=True, oldest_first=True))
        finally:
            store.close()
        assert total == 6
        recorded = date_range(WHEN)[0]
        assert sorted(rows, key=lambda r: r.id) == [
            AuditRow("a1", recorded, "search", "0", "peer-app", PARTNER, "TREAT", "Patient/p1",
                     ("Observation/o1", "Observation/o2"), QUERY),
            AuditRow("a2", recorded, "create", "0", "emr", None, None, None, ("Patient/p1", "Patient/p2")),
            AuditRow("a3", recorded, "read", "4", "emr", None, None, None, ("CarePlan/x",)),
            AuditRow("a4", recorded, "export", "0", "emr", None, None, "Patient/p2", ("Encounter/e1",)),
            AuditRow("a5", date_range("2026-05-02T07:00:00Z")[0], "disclose", "0", "iop-fhir-worker", PARTNER,
                     "TREAT", "Patient/p1", ("CarePlan/c1",)),
            AuditRow("a6", recorded, "update", "0", "unknown", None, None, None, ()),
        ]  # fmt: skip
        # What the migrated rows render as is what was stored (the ids and meta.lastUpdated aside).
        for row in rows:
            if row.id != "a6":
                rendered = audit.render(row)
                original = events[row.id]
                assert {k: v for k, v in rendered.items() if k not in ("id", "meta", "recorded")} == {
                    k: v for k, v in original.items() if k not in ("meta", "recorded")
                }
        tables = (schema.resources, schema.history, schema.version_patients, *schema.INDEX_TABLES.values())
        assert {t.name: _count(engine, t, "AuditEvent") for t in tables} == {t.name: 0 for t in tables}
        assert {t.name: _count(engine, t, "Patient") for t in (schema.resources, schema.history)} == before
        assert _count(engine, schema.idx_string, "Patient") > 0

        migrate_to(engine, "0009", down=True)
        with engine.connect() as conn:
            assert not engine.dialect.has_table(conn, "audit_log")
    finally:
        engine.dispose()
