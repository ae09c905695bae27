"""The SQL store: SQLite (embedded default, WAL) or PostgreSQL, through SQLAlchemy Core.

Concurrency: every write runs in one database transaction. On SQLite a write transaction starts with
``BEGIN IMMEDIATE``, which serialises writers across threads and processes. On PostgreSQL writers take
transaction-scoped advisory locks (per resource, and per type for conditional interactions), so check-then-write
sequences such as conditional create or If-Match updates are race-free on both databases.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from typing import Any

import orjson
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Select,
    Table,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlalchemy.pool import StaticPool

from iop_fhir.r4 import definitions, indexing
from iop_fhir.r4 import search as search_rules
from iop_fhir.r4.indexing import IndexRows
from iop_fhir.r4.search import Visibility
from iop_fhir.store import schema, search_sql, writerlock
from iop_fhir.store.audit_sql import SqlAuditLog, SqlAuditLogTx, dbapi_connection
from iop_fhir.store.base import (
    GROUP_SESSION,
    REFERRAL,
    RETRYABLE_BY_HAND,
    Delivery,
    HistoryCursor,
    SearchResult,
    StoredClient,
    StoredRecord,
    StoredResource,
    VersionFacts,
    attendees,
    record_day,
)

_R = schema.resources
_H = schema.history
_REC = schema.iop_records
_REC_COLUMNS = (
    _REC.c.kind,
    _REC.c.id,
    _REC.c.enrollment_id,
    _REC.c.status,
    _REC.c.version,
    _REC.c.content,
    _REC.c.resources,
    _REC.c.created,
    _REC.c.updated,
)
# The ids of the enrollments whose records are read in one query (an IN list).
RECORDS_BATCH = 500
_GA = schema.group_attendees
_IR = schema.inbound_referrals
_IR_COLUMNS = tuple(_IR.c)
_O = schema.outbox
_SC = schema.sync_cursors
_SE = schema.subscription_events
_AC = schema.auth_clients
_AJ = schema.auth_jtis
# Answered from the index on (res_type, last_updated) of the history; built once (a write pays ~15 µs for it).
# The number of resources of a type and the sum of their current version ids: every create, update and delete of
# the type changes it, whichever process's clock stamped the write (ResourceStore.type_versions).
_TYPE_VERSIONS = select(func.count(), func.coalesce(func.sum(_R.c.version_id), 0)).where(
    _R.c.res_type == bindparam("res_type")
)
_O_COLUMNS = tuple(_O.c)
# One statement: the CTE locks the due rows no other transaction holds (SKIP LOCKED), the UPDATE leases them. A row
# another worker leased since this statement's snapshot is re-checked on its newest version and no longer due.
# MATERIALIZED keeps the locking subquery from being inlined and run more than once.
_CLAIM_POSTGRES = text(
    "WITH due AS MATERIALIZED ("
    " SELECT id FROM outbox WHERE status IN ('pending', 'delivering') AND next_attempt_at <= :now"
    " ORDER BY next_attempt_at LIMIT :limit FOR UPDATE SKIP LOCKED)"
    " UPDATE outbox SET status = 'delivering', attempts = outbox.attempts + 1, leased_by = :worker,"
    " lease_until = :until, next_attempt_at = :until, updated = :now"
    " FROM due WHERE outbox.id = due.id"
    f" RETURNING {', '.join(f'outbox.{c.name}' for c in _O_COLUMNS)}"
)


def make_engine(url: str, *, echo: bool = False) -> Engine:
    if url.startswith("sqlite"):
        return _sqlite_engine(url, echo)
    # JIT compilation pays off for long analytical queries; for this service's short ones PostgreSQL's cost estimate
    # of a restricted search over a million resources starts it, and compiling took longer than the query itself.
    # A search is planned for its own values every time (psycopg prepares a statement run five times, and
    # PostgreSQL may then keep one generic plan): a common code and a rare one need opposite plans, and the generic
    # one chosen for a common code read 80,000 rows to page 20 (600 ms where its own plan takes 7).
    # Options the URL gives (a search_path, say) come after, so they win over these defaults.
    given = make_url(url).query.get("options", "")
    defaults = ["-c jit=off", "-c plan_cache_mode=force_custom_plan"]
    options = " ".join([*defaults, *([given] if isinstance(given, str) else given)]).strip()
    return create_engine(
        url, echo=echo, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args={"options": options}
    )


SQLITE_BUSY_S = 60  # how long a SQLite connection waits for another's lock
# SQLite keeps no statistics unless told to, and without them its planner walks the wrong index of a restricted or
# sorted search over a large database. The store refreshes them (an ANALYZE sampling at most this many rows of each
# index, a few milliseconds at any size) when it opens a file that has none, and after every STATISTICS_EVERY
# resources this process writes. PostgreSQL analyses on its own (autovacuum).
SQLITE_ANALYSIS_LIMIT = 1000
STATISTICS_EVERY = 20_000


def _use_wal(cursor: Any, wait_s: float) -> None:
    """Put the database in WAL mode (kept in the file). A connection that opens while another one switches a new file
    to WAL, or recovers its WAL, can be told "database is locked" at once, without SQLite's busy handler waiting: that
    is tried again, for up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _sqlite_engine(url: str, echo: bool) -> Engine:
    memory = url in ("sqlite://", "sqlite:///:memory:")
    engine = create_engine(
        url,
        echo=echo,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_S},
        # An in-memory database exists only inside its one connection, so every thread must share it.
        **({"poolclass": StaticPool} if memory else {}),
    )

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the sqlite3 module so BEGIN IMMEDIATE can be issued for writes.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_S * 1000)}")
        _use_wal(cursor, SQLITE_BUSY_S)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("iop_write") else "BEGIN")

    return engine


def _bytes(content: Any) -> bytes | None:
    return None if content is None else bytes(content)


def _lock_id(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


def _row_to_stored(res_type: str, res_id: str, row: Any, method: str | None = None) -> StoredResource:
    return StoredResource(
        res_type=res_type,
        res_id=res_id,
        version_id=row.version_id,
        last_updated=row.last_updated,
        deleted=bool(row.deleted) if method is None else method == "DELETE",
        content=row.content,
        method=method,
    )


def _row_to_record(row: Any) -> StoredRecord:
    return StoredRecord(
        kind=row.kind,
        id=row.id,
        enrollment_id=row.enrollment_id,
        status=row.status,
        version=row.version,
        content=orjson.loads(row.content),
        resources=orjson.loads(row.resources),
        created=row.created,
        updated=row.updated,
    )


def _record_values(record: StoredRecord) -> dict[str, Any]:
    return {
        "enrollment_id": record.enrollment_id,
        "status": record.status,
        "version": record.version,
        "content": orjson.dumps(record.content),
        "resources": orjson.dumps(record.resources),
        "created": record.created,
        "updated": record.updated,
        "record_day": record_day(record.kind, record.content),
    }


def _batches(ids: Iterable[str]) -> Iterator[list[str]]:
    distinct = list(dict.fromkeys(ids))
    for start in range(0, len(distinct), RECORDS_BATCH):
        yield distinct[start : start + RECORDS_BATCH]


# A set of record rows changes its (count, sum of versions, latest update, sum of updates modulo a prime) whenever a
# record of it is written (each write raises the version and stamps the update), joins it or leaves it.
_KEY_MODULUS = 2_147_483_647
_NO_ROWS = (0, 0, 0, 0)


def _key_fields(table: Table) -> tuple[ColumnElement[Any], ...]:
    return (
        func.count(),
        func.coalesce(func.sum(table.c.version), 0),
        func.coalesce(func.max(table.c.updated), 0),
        func.coalesce(func.sum(table.c.updated % _KEY_MODULUS), 0),
    )


def _oldest_first(rows: Iterable[Any]) -> list[StoredRecord]:
    return [_row_to_record(r) for r in sorted(rows, key=lambda r: (r.created, r.id))]


def _row_to_referral(row: Any) -> StoredRecord:
    return StoredRecord(
        kind=REFERRAL,
        id=row.id,
        enrollment_id=row.enrollment_id,
        status=row.record_status,
        version=row.version,
        content=orjson.loads(row.content),
        resources=orjson.loads(row.resources),
        created=row.created,
        updated=row.updated,
    )


def _referral_values(referral: StoredRecord) -> dict[str, Any]:
    if referral.kind != REFERRAL:
        raise ValueError(f"a referral is a record of kind {REFERRAL!r}, not {referral.kind!r}")  # programming error
    return {
        "status": referral.content["status"],
        "record_status": referral.status,
        "enrollment_id": referral.enrollment_id,
        "version": referral.version,
        "content": orjson.dumps(referral.content),
        "resources": orjson.dumps(referral.resources),
        "created": referral.created,
        "updated": referral.updated,
    }


def _row_to_client(row: Any) -> StoredClient:
    return StoredClient(
        client_id=row.client_id,
        name=row.name,
        jwks=json.loads(row.jwks),
        scope=row.scope,
        partner_id=row.partner_id,
        purpose_of_use=row.purpose_of_use,
        admin=bool(row.admin),
        active=bool(row.active),
        created=int(row.created),
        consents=bool(row.consents),
    )


def _json_or_none(content: Any) -> Any:
    return None if content is None else orjson.loads(content)


def _row_to_delivery(row: Any) -> Delivery:
    return Delivery(
        id=row.id,
        partner_id=row.partner_id,
        record_kind=row.record_kind,
        record_id=row.record_id,
        kind=row.kind,
        payload=orjson.loads(row.payload),
        status=row.status,
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        created=row.created,
        updated=row.updated,
        lease_until=row.lease_until,
        leased_by=row.leased_by,
        last_error=_json_or_none(row.last_error),
        response=_json_or_none(row.response),
        delivered_at=row.delivered_at,
    )


def _delivery_values(delivery: Delivery) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "partner_id": delivery.partner_id,
        "record_kind": delivery.record_kind,
        "record_id": delivery.record_id,
        "kind": delivery.kind,
        "payload": orjson.dumps(delivery.payload),
        "status": delivery.status,
        "attempts": delivery.attempts,
        "next_attempt_at": delivery.next_attempt_at,
        "lease_until": delivery.lease_until,
        "leased_by": delivery.leased_by,
        "last_error": None if delivery.last_error is None else orjson.dumps(delivery.last_error),
        "response": None if delivery.response is None else orjson.dumps(delivery.response),
        "created": delivery.created,
        "updated": delivery.updated,
        "delivered_at": delivery.delivered_at,
    }


# The tables a write transaction buffers rows for, in the order they are sent: parents first (resources, then
# history, then the version's patients and index rows), then the outbox.
_FLUSH_ORDER = (
    _R,
    _H,
    schema.version_patients,
    *schema.INDEX_TABLES.values(),
    _O,
)
COPY_ROWS = 32  # a buffered batch this large goes to PostgreSQL as COPY (fewer: an executemany)


@dataclass(frozen=True)
class _InsertPlan:
    """How rows with one set of keys are inserted into one table on the DBAPI: the columns, the values of omitted
    columns that have a Python-side default, and the statements."""

    columns: tuple[str, ...]
    defaults: tuple[Any, ...]
    insert: str
    copy: str

    def values(self, row: dict[str, Any]) -> tuple[Any, ...]:
        picked: tuple[Any, ...] = self._pick(row) if len(self.columns) > 1 else (row[self.columns[0]],)
        return picked + self.defaults if self.defaults else picked

    @functools.cached_property
    def _pick(self) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
        return operator.itemgetter(*self.columns)


@functools.cache
def _insert_plan(table: Table, keys: tuple[str, ...], postgres: bool) -> _InsertPlan | None:
    """None when a column the rows omit has a default only SQLAlchemy can compute (a callable): those rows go
    through SQLAlchemy's insert."""
    columns = tuple(k for k in keys if k in table.c)
    defaults: list[tuple[str, Any]] = []
    for column in table.c:
        if column.name in columns or column.default is None:
            continue
        if not column.default.is_scalar:
            return None
        defaults.append((column.name, column.default.arg))  # type: ignore[attr-defined]
    dialect = postgresql.dialect() if postgres else sqlite.dialect()
    quote = dialect.identifier_preparer.quote
    names = ", ".join(quote(name) for name in (*columns, *(name for name, _ in defaults)))
    marker = "%s" if postgres else "?"
    placeholders = ", ".join([marker] * (len(columns) + len(defaults)))
    target = quote(table.name)
    return _InsertPlan(
        columns=columns,
        defaults=tuple(value for _, value in defaults),
        insert=f"INSERT INTO {target} ({names}) VALUES ({placeholders})",
        copy=f"COPY {target} ({names}) FROM STDIN",
    )


class SqlWriteTx(SqlAuditLogTx):
    """One write transaction. Inserts are buffered and sent in batches before any read and at commit."""

    def __init__(self, conn: Connection, postgres: bool) -> None:
        self.conn = conn
        self.postgres = postgres
        self._known: dict[tuple[str, str], StoredResource | None] = {}
        self._locked: set[str] = set()
        self._pending: dict[str, list[dict[str, Any]]] = {}
        self.saved = 0  # resource versions saved (for SqlStore's statistics)
        # Run once the transaction's body has succeeded, just before it commits, and in it (the audit trail).
        self.before_commit: list[Callable[[], None]] = []

    def lock(self, key: str) -> None:
        if self.postgres and key not in self._locked:
            self.conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_id(key)})
            self._locked.add(key)

    def current(self, res_type: str, res_id: str) -> StoredResource | None:
        key = (res_type, res_id)
        if key in self._known:
            return self._known[key]
        self.lock(f"{res_type}/{res_id}")
        self.flush()
        row = self.conn.execute(
            select(_R.c.version_id, _R.c.last_updated, _R.c.deleted, _R.c.content).where(
                _R.c.res_type == res_type, _R.c.res_id == res_id
            )
        ).first()
        found = _row_to_stored(res_type, res_id, row) if row else None
        self._known[key] = found
        return found

    def reserve(self, res_type: str, res_id: str) -> None:
        """Declare a server-assigned (fresh uuid) id as new without a round trip; the primary key still guards."""
        self._known.setdefault((res_type, res_id), None)

    def _queue(self, table: str, row: dict[str, Any]) -> None:
        self._pending.setdefault(table, []).append(row)

    def save(self, version: StoredResource, index: IndexRows, facts: VersionFacts) -> None:
        key = (version.res_type, version.res_id)
        if key not in self._known:
            raise RuntimeError("save() needs current() first")  # programming error, never user input
        previous = self._known[key]
        self.saved += 1
        values = {
            "version_id": version.version_id,
            "last_updated": version.last_updated,
            "deleted": False,
            "content": version.content,
        }
        visibility = {"owner": facts.owner, "protected": facts.protected, "note": facts.note}
        if previous is None:
            self._queue("resources", {"res_type": version.res_type, "res_id": version.res_id, **values, **visibility})
        else:
            self.flush()
            self.conn.execute(
                update(_R)
                .where(_R.c.res_type == version.res_type, _R.c.res_id == version.res_id)
                .values(**values, **visibility)
            )
            self._drop_index(version.res_type, version.res_id)
        self._queue(
            "resource_history",
            {
                "res_type": version.res_type,
                "res_id": version.res_id,
                "method": version.method or "PUT",
                **values,
                "protected": facts.protected,
                "note": facts.note,
            },
        )
        base = {"res_type": version.res_type, "res_id": version.res_id}
        for patient in facts.patients:
            self._queue("version_patients", {**base, "version_id": version.version_id, "patient_id": patient})
        for kind, rows in index.items():
            table = schema.INDEX_TABLES[kind].name
            for row in indexing.mark_sort_rows(kind, rows):
                self._queue(table, {**base, **row})
        self._known[key] = version

    def delete(self, res_type: str, res_id: str, version_id: int, last_updated: int) -> None:
        self.flush()
        self.conn.execute(
            update(_R)
            .where(_R.c.res_type == res_type, _R.c.res_id == res_id)
            .values(version_id=version_id, last_updated=last_updated, deleted=True, content=None)
        )
        # The deletion discloses what the deleted version did: it keeps that version's visibility facts.
        deleted = (_H.c.res_type == res_type, _H.c.res_id == res_id, _H.c.version_id == version_id - 1)
        flags = self.conn.execute(select(_H.c.protected, _H.c.note).where(*deleted)).first()
        self._queue(
            "resource_history",
            {
                "res_type": res_type,
                "res_id": res_id,
                "version_id": version_id,
                "last_updated": last_updated,
                "method": "DELETE",
                "deleted": True,
                "content": None,
                "protected": bool(flags.protected) if flags else False,
                "note": bool(flags.note) if flags else False,
            },
        )
        _VP = schema.version_patients
        self.conn.execute(
            insert(_VP).from_select(
                ["res_type", "res_id", "version_id", "patient_id"],
                select(_VP.c.res_type, _VP.c.res_id, literal(version_id), _VP.c.patient_id).where(
                    _VP.c.res_type == res_type, _VP.c.res_id == res_id, _VP.c.version_id == version_id - 1
                ),
            )
        )
        self._drop_index(res_type, res_id)
        self._known[(res_type, res_id)] = StoredResource(res_type, res_id, version_id, last_updated, True, None)

    def version_visible(self, res_type: str, res_id: str, version_id: int, restriction: Visibility) -> bool:
        self.flush()
        query = select(_H.c.version_id).where(
            _H.c.res_type == res_type,
            _H.c.res_id == res_id,
            _H.c.version_id == version_id,
            restriction.version_clause(_H),
        )
        return self.conn.execute(query).first() is not None

    def _drop_index(self, res_type: str, res_id: str) -> None:
        for table in schema.INDEX_TABLES.values():
            self.conn.execute(delete(table).where(table.c.res_type == res_type, table.c.res_id == res_id))

    def search(self, request: Any) -> SearchResult:
        self.flush()
        return search_sql.run(self.conn, request)

    def record(self, kind: str, id: str, *, lock: bool = True) -> StoredRecord | None:
        if lock:
            self.lock(f"record:{kind}/{id}")
        row = self.conn.execute(select(*_REC_COLUMNS).where(_REC.c.kind == kind, _REC.c.id == id)).first()
        return _row_to_record(row) if row else None

    def save_record(self, record: StoredRecord) -> None:
        # The lock makes update-else-insert race-free on PostgreSQL; on SQLite the write transaction already is.
        self.lock(f"record:{record.kind}/{record.id}")
        values = _record_values(record)
        updated = self.conn.execute(
            update(_REC).where(_REC.c.kind == record.kind, _REC.c.id == record.id).values(**values)
        )
        if updated.rowcount == 0:
            self.conn.execute(insert(_REC).values(kind=record.kind, id=record.id, **values))
        if record.kind == "enrollment":
            self._stay_end(record.id)
        elif record.kind == "discharge" and record.enrollment_id is not None:
            self._stay_end(record.enrollment_id)
        elif record.kind == GROUP_SESSION:
            self.conn.execute(delete(_GA).where(_GA.c.group_id == record.id))
            rows = [{"group_id": record.id, "enrollment_id": e} for e in attendees(record.kind, record.content)]
            if rows:
                self.conn.execute(insert(_GA), rows)

    def _stay_end(self, enrollment_id: str) -> None:
        """The enrollment's row takes the day of its latest active discharge (the one its stay ends with)."""
        latest = (
            select(_REC.c.record_day)
            .where(_REC.c.kind == "discharge", _REC.c.enrollment_id == enrollment_id, _REC.c.status == "active")
            .order_by(_REC.c.updated.desc(), _REC.c.created, _REC.c.id)
            .limit(1)
        )
        day = self.conn.execute(latest).scalar_one_or_none()
        self.conn.execute(
            update(_REC).where(_REC.c.kind == "enrollment", _REC.c.id == enrollment_id).values(stay_end=day)
        )

    def referral(self, id: str, *, lock: bool = True) -> StoredRecord | None:
        if lock:
            self.lock(f"inbound-referral:{id}")
        row = self.conn.execute(select(*_IR_COLUMNS).where(_IR.c.id == id)).first()
        return _row_to_referral(row) if row else None

    def save_referral(self, referral: StoredRecord) -> None:
        # The lock makes update-else-insert race-free on PostgreSQL; on SQLite the write transaction already is.
        values = _referral_values(referral)
        self.lock(f"inbound-referral:{referral.id}")
        if self.conn.execute(update(_IR).where(_IR.c.id == referral.id).values(**values)).rowcount == 0:
            self.conn.execute(insert(_IR).values(id=referral.id, **values))

    def next_subscription_event(self, sub_id: str, now: int) -> int:
        # One statement: the upsert locks the counter's row (on PostgreSQL a concurrent one waits for this
        # transaction and then counts on from what it committed; SQLite writers are serialised already).
        upsert = (postgresql.insert if self.postgres else sqlite.insert)(_SE)
        statement = (
            upsert.values(sub_id=sub_id, events=1, updated=now)
            .on_conflict_do_update(index_elements=[_SE.c.sub_id], set_={"events": _SE.c.events + 1, "updated": now})
            .returning(_SE.c.events)
        )
        return int(self.conn.execute(statement).scalar_one())

    def enqueue(self, delivery: Delivery) -> None:
        self._queue("outbox", _delivery_values(delivery))

    def deliveries_to(self, partner_id: str, statuses: tuple[str, ...]) -> list[Delivery]:
        self.flush()
        query = (
            select(*_O_COLUMNS)
            .where(_O.c.partner_id == partner_id, _O.c.status.in_(statuses))
            .order_by(_O.c.created, _O.c.id)
        )
        if self.postgres:
            # A worker's claim (FOR UPDATE SKIP LOCKED) passes over these rows until this transaction ends; a row it
            # claimed meanwhile is re-checked on its new version and no longer matches.
            query = query.with_for_update()
        return [_row_to_delivery(r) for r in self.conn.execute(query).all()]

    def set_delivery_status(
        self, id: str, expected: tuple[str, ...], status: str, last_error: dict[str, Any] | None, now: int
    ) -> bool:
        self.flush()
        values = {
            "status": status,
            "last_error": None if last_error is None else orjson.dumps(last_error),
            "next_attempt_at": now,
            "lease_until": None,
            "updated": now,
        }
        changed = self.conn.execute(update(_O).where(_O.c.id == id, _O.c.status.in_(expected)).values(**values))
        return bool(changed.rowcount == 1)

    def type_versions(self, res_type: str) -> tuple[int, int]:
        self.flush()
        rows, versions = self.conn.execute(_TYPE_VERSIONS, {"res_type": res_type}).one()
        return int(rows), int(versions)

    def save_sync_cursor(self, partner_id: str, patient_id: str, res_type: str, last_updated: str, now: int) -> None:
        key = (_SC.c.partner_id == partner_id, _SC.c.patient_id == patient_id, _SC.c.res_type == res_type)
        # The lock makes update-else-insert race-free on PostgreSQL; on SQLite the write transaction already is.
        self.lock(f"sync:{partner_id}/{patient_id}/{res_type}")
        values = {"last_updated": last_updated, "updated": now}
        if self.conn.execute(update(_SC).where(*key).values(**values)).rowcount == 0:
            self.conn.execute(
                insert(_SC).values(partner_id=partner_id, patient_id=patient_id, res_type=res_type, **values)
            )

    def flush(self) -> None:
        # Parents first: resources, then history, then index rows.
        for table in _FLUSH_ORDER:
            rows = self._pending.pop(table.name, None)
            if rows:
                self._insert(table, rows)

    def _insert(self, table: Table, rows: list[dict[str, Any]]) -> None:
        """Insert buffered rows, in order, one statement per run of rows with the same keys. Keys that name no
        column of the table are left out (a history row is queued with the current row's ``deleted``)."""
        start = 0
        while start < len(rows):
            keys = rows[start].keys()
            end = start + 1
            while end < len(rows) and rows[end].keys() == keys:
                end += 1
            run = rows[start:end] if start or end < len(rows) else rows
            plan = _insert_plan(table, tuple(keys), self.postgres)
            raw: Any = self.conn.connection.driver_connection
            # SQLite's module runs in autocommit mode (the engine issues BEGIN): rows go past SQLAlchemy only
            # inside the transaction it began.
            if plan is None or not (self.postgres or raw.in_transaction):
                self.conn.execute(insert(table), [{k: r[k] for k in r if k in table.c} for r in run])
            else:
                self._send(raw, plan, run)
            start = end

    def _send(self, raw: Any, plan: _InsertPlan, rows: list[dict[str, Any]]) -> None:
        """Rows straight to the DBAPI connection of this transaction: SQLAlchemy's parameter processing, and
        psycopg's pipelined executemany, cost more per row than the database's insert itself. On PostgreSQL a
        batch of at least ``COPY_ROWS`` is one COPY. Errors are raised as SQLAlchemy's, as statements sent
        through the connection raise them."""
        values = [plan.values(row) for row in rows]
        statement = plan.insert
        try:
            if self.postgres and len(values) >= COPY_ROWS:
                statement = plan.copy
                with raw.cursor() as cursor, cursor.copy(plan.copy) as copy:
                    for row in values:
                        copy.write_row(row)
            else:
                cursor = raw.cursor()
                try:
                    if len(values) == 1:
                        cursor.execute(plan.insert, values[0])
                    else:
                        cursor.executemany(plan.insert, values)
                finally:
                    cursor.close()
        except self.conn.dialect.loaded_dbapi.Error as error:
            raise DBAPIError.instance(statement, None, error, self.conn.dialect.loaded_dbapi.Error) from error


def history_statements(
    res_type: str | None,
    res_id: str | None,
    *,
    since: int | None,
    at: int | None,
    count: int,
    offset: int,
    types: frozenset[str] | None = None,
    restriction: Visibility | None = None,
    after: HistoryCursor | None = None,
) -> tuple[Select[Any], Select[Any]]:
    """The statements of a history page (SqlStore.history): the versions the total counts, and the page's."""
    conditions: list[Any] = []
    if res_type is not None:
        conditions.append(_H.c.res_type == res_type)
    if types is not None:
        # Most clients may read all but a few types (AuditEvent is the administrators'): naming the few left out
        # lets the database walk the history newest first, where a list of a hundred types made SQLite sort all of
        # every type's versions to serve fifty.
        left_out = definitions.resource_types() - types
        if len(left_out) < len(types):
            conditions.append(_H.c.res_type.not_in(sorted(left_out)))
        else:
            conditions.append(_H.c.res_type.in_(sorted(types)))
    if restriction is not None:
        conditions.append(restriction.version_clause(_H))
    if res_id is not None:
        conditions.append(_H.c.res_id == res_id)
    if since is not None:
        conditions.append(_H.c.last_updated >= since)
    if at is not None:
        conditions.append(_H.c.last_updated <= at)
    if after is not None:
        conditions.append(_H.c.last_updated <= after.snapshot)
    query = (
        select(_H.c.res_type, _H.c.res_id, _H.c.version_id, _H.c.last_updated, _H.c.method, _H.c.content)
        .where(*conditions, *([_history_after(after)] if after is not None else []))
        .order_by(_H.c.last_updated.desc(), _H.c.version_id.desc(), _H.c.res_type, _H.c.res_id)
        .limit(count)
        .offset(offset if after is None else 0)
    )
    return select(_H.c.last_updated).where(*conditions), query


def _history_after(cursor: HistoryCursor) -> ColumnElement[bool]:
    """The versions after ``cursor``'s in history order (last_updated and version_id descending, then type and id
    ascending); the bound on last_updated alone lets the database walk an index from the cursor's place."""
    c = _H.c
    tie = or_(
        c.version_id < cursor.version_id,
        and_(
            c.version_id == cursor.version_id,
            or_(c.res_type > cursor.res_type, and_(c.res_type == cursor.res_type, c.res_id > cursor.res_id)),
        ),
    )
    return and_(
        c.last_updated <= cursor.last_updated,
        or_(c.last_updated < cursor.last_updated, and_(c.last_updated == cursor.last_updated, tie)),
    )


class _DirectReads:
    """Single-statement reads by primary key (read, vread) on plain DBAPI connections in autocommit mode.

    Read-by-id is the hottest path of the service and a 3 µs lookup; SQLAlchemy's statement construction, cache
    lookup, pool checkout and transaction events cost ~50 times that. Each statement still runs in a transaction
    of its own, so it sees exactly the committed state. Idle connections are kept up to ``keep``.
    """

    def __init__(self, engine: Engine, keep: int = 8) -> None:
        self.engine = engine
        self.keep = keep
        self.placeholder = "?" if engine.dialect.name == "sqlite" else "%s"
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()

    def _connect(self) -> Any:
        return dbapi_connection(self.engine)

    def one(self, sql: str, params: tuple[Any, ...]) -> Any:
        sql = sql.replace("?", self.placeholder)
        try:
            connection = self._idle.get_nowait()
        except queue.Empty:
            connection = self._connect()
        try:
            cursor = connection.cursor()
            cursor.execute(sql, params)
            row = cursor.fetchone()
            cursor.close()
        except Exception:
            connection.close()
            raise
        if self._idle.qsize() < self.keep:
            self._idle.put(connection)
        else:
            connection.close()
        return row

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


_READ_SQL = "SELECT version_id, last_updated, deleted, content FROM resources WHERE res_type = ? AND res_id = ?"
_VREAD_SQL = (
    "SELECT version_id, last_updated, method, content FROM resource_history"
    " WHERE res_type = ? AND res_id = ? AND version_id = ?"
)


class SqlStore(SqlAuditLog):
    """Every protocol of store/base.py (Store, ClientTables) over one SQLAlchemy engine."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        self.engine = make_engine(url, echo=echo)
        self.postgres = self.engine.dialect.name == "postgresql"
        # An in-memory SQLite database exists only in the engine's one connection: no direct reads there.
        memory = url in ("sqlite://", "sqlite:///:memory:")
        self._direct = None if memory else _DirectReads(self.engine)
        # What the DBAPI raises for a key it cannot even compare, such as an id with NUL in it on PostgreSQL: no
        # stored resource has such an id (the FHIR layer refuses them on writes), so a read finds nothing.
        self._unreadable_key: tuple[type[Exception], ...] = (self.engine.dialect.loaded_dbapi.DataError, DataError)
        self._saved_since_statistics = 0
        self._statistics_lock = threading.Lock()

    def refresh_statistics(self, *, if_missing: bool = False) -> bool:
        """Refresh SQLite's planner statistics (sampled: PRAGMA analysis_limit); with ``if_missing`` only for a file
        that has none yet. PostgreSQL keeps its own. Whether statistics were taken."""
        if self.postgres or self.url in ("sqlite://", "sqlite:///:memory:"):
            return False
        if if_missing:
            with self.reading() as conn:
                if conn.exec_driver_sql("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'").first():
                    return False
        with self.writing() as conn:
            conn.exec_driver_sql(f"PRAGMA analysis_limit={SQLITE_ANALYSIS_LIMIT}")
            conn.exec_driver_sql("ANALYZE")
        return True

    def _count_saves(self, saved: int) -> None:
        if self.postgres or not saved:
            return
        with self._statistics_lock:
            self._saved_since_statistics += saved
            due = self._saved_since_statistics >= STATISTICS_EVERY
            if due:
                self._saved_since_statistics = 0
        if due:
            self.refresh_statistics()

    def close(self) -> None:
        self.closing()  # first, the audit log's writer commits what it holds
        if self._direct is not None:
            self._direct.close()
        self.engine.dispose()

    @contextmanager
    def write(self) -> Iterator[SqlWriteTx]:
        with (
            writerlock.writing(self.engine),
            self.engine.connect().execution_options(iop_write=True) as conn,
            conn.begin(),
        ):
            tx = SqlWriteTx(conn, self.postgres)
            yield tx
            while tx.before_commit:
                tx.before_commit.pop(0)()
            tx.flush()
        self._count_saves(tx.saved)

    @contextmanager
    def writing(self) -> Iterator[Connection]:
        """A short write transaction on the database (BEGIN IMMEDIATE on SQLite), outside any WriteTx: the outbox's
        leases, the clients' tables, and export jobs (store/export_sql.py)."""
        with (
            writerlock.writing(self.engine),
            self.engine.connect().execution_options(iop_write=True) as conn,
            conn.begin(),
        ):
            yield conn

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A read transaction on the database, outside any WriteTx (also for store/export_sql.py)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def _by_key(self, sql: str, params: tuple[Any, ...]) -> Any:
        """One row by primary key: directly on the DBAPI, or through the engine for an in-memory database."""
        try:
            if self._direct is not None:
                return self._direct.one(sql, params)
            with self.reading() as conn:
                return conn.exec_driver_sql(sql.replace("?", "%s" if self.postgres else "?"), params).first()
        except self._unreadable_key:
            return None

    def read(self, res_type: str, res_id: str) -> StoredResource | None:
        found = self._by_key(_READ_SQL, (res_type, res_id))
        if found is None:
            return None
        version_id, last_updated, deleted, content = found
        return StoredResource(res_type, res_id, version_id, last_updated, bool(deleted), _bytes(content))

    def vread(self, res_type: str, res_id: str, version_id: int) -> StoredResource | None:
        found = self._by_key(_VREAD_SQL, (res_type, res_id, version_id))
        if found is None:
            return None
        version, last_updated, method, content = found
        return StoredResource(res_type, res_id, version, last_updated, method == "DELETE", _bytes(content), method)

    def history(
        self,
        res_type: str | None,
        res_id: str | None,
        *,
        since: int | None,
        at: int | None,
        count: int,
        offset: int,
        types: frozenset[str] | None = None,
        restriction: Visibility | None = None,
        after: HistoryCursor | None = None,
    ) -> tuple[list[StoredResource], int | None]:
        """Versions newest first (https://hl7.org/fhir/R4/http.html#history); ``types`` limits a system history to
        the types a client may search, ``restriction`` to the versions it may see, each decided on the patients and
        labels of that version (a deletion on those of the version it deleted). After a cursor: the page that
        follows its entry (keyset, so as fast at any depth), and the total as it stood at the cursor's snapshot;
        versions are never changed once written, so the pages of one paging neither skip nor repeat an entry. The
        total is counted up to r4.search.COUNT_LIMIT versions, None above that."""
        matching, query = history_statements(
            res_type,
            res_id,
            since=since,
            at=at,
            count=count,
            offset=offset,
            types=types,
            restriction=restriction,
            after=after,
        )
        with self.reading() as conn:
            total = search_sql.count_matches(conn, matching, search_rules.COUNT_LIMIT)
            rows = conn.execute(query).all() if count else []
        return [_row_to_stored(r.res_type, r.res_id, r, r.method) for r in rows], total

    def histories(self, res_type: str, res_ids: Iterable[str]) -> dict[str, list[StoredResource]]:
        # One statement per batch of ids, each walking the primary key (res_type, res_id, version_id).
        found: dict[str, list[StoredResource]] = {}
        with self.reading() as conn:
            for batch in _batches(res_ids):
                query = (
                    select(_H.c.res_id, _H.c.version_id, _H.c.last_updated, _H.c.method, _H.c.content)
                    .where(_H.c.res_type == res_type, _H.c.res_id.in_(batch))
                    .order_by(_H.c.res_id, _H.c.last_updated.desc(), _H.c.version_id.desc())
                )
                for row in conn.execute(query):
                    found.setdefault(row.res_id, []).append(_row_to_stored(res_type, row.res_id, row, row.method))
        return found

    def type_versions(self, res_type: str) -> tuple[int, int]:
        with self.reading() as conn:
            rows, versions = conn.execute(_TYPE_VERSIONS, {"res_type": res_type}).one()
        return int(rows), int(versions)

    def search(self, request: Any) -> SearchResult:
        with self.reading() as conn:
            return search_sql.run(conn, request)

    def version_visible(self, res_type: str, res_id: str, version_id: int, restriction: Visibility) -> bool:
        query = select(_H.c.version_id).where(
            _H.c.res_type == res_type,
            _H.c.res_id == res_id,
            _H.c.version_id == version_id,
            restriction.version_clause(_H),
        )
        with self.reading() as conn:
            return conn.execute(query).first() is not None

    def record(self, kind: str, id: str) -> StoredRecord | None:
        try:
            with self.reading() as conn:
                row = conn.execute(select(*_REC_COLUMNS).where(_REC.c.kind == kind, _REC.c.id == id)).first()
        except self._unreadable_key:
            return None
        return _row_to_record(row) if row else None

    def records(
        self, kind: str, *, enrollment_id: str | None = None, offset: int = 0, count: int = 20
    ) -> tuple[list[StoredRecord], int]:
        conditions = [_REC.c.kind == kind]
        if enrollment_id is not None:
            conditions.append(_REC.c.enrollment_id == enrollment_id)
        query = select(*_REC_COLUMNS).where(*conditions).order_by(_REC.c.created, _REC.c.id).limit(count).offset(offset)
        try:
            with self.reading() as conn:
                total = conn.execute(select(func.count()).select_from(_REC).where(*conditions)).scalar_one()
                rows = conn.execute(query).all() if count else []
        except self._unreadable_key:
            return [], 0
        return [_row_to_record(r) for r in rows], total

    def enrollments_during(self, start: date, end: date) -> list[StoredRecord]:
        # Open stays (no readable discharge day) and those that ended on or after start: two ranges of one index.
        query = select(*_REC_COLUMNS).where(
            _REC.c.kind == "enrollment",
            _REC.c.status == "active",
            (_REC.c.stay_end.is_(None)) | (_REC.c.stay_end >= start.isoformat()),
            _REC.c.record_day <= end.isoformat(),
        )
        with self.reading() as conn:
            return _oldest_first(conn.execute(query).all())

    def records_of(self, kinds: Iterable[str], enrollment_ids: Iterable[str]) -> list[StoredRecord]:
        wanted = list(kinds)
        rows: list[Any] = []
        with self.reading() as conn:
            for batch in _batches(enrollment_ids):
                query = select(*_REC_COLUMNS).where(_REC.c.kind.in_(wanted), _REC.c.enrollment_id.in_(batch))
                rows += conn.execute(query).all()
        return _oldest_first(rows)

    def group_sessions_of(self, enrollment_ids: Iterable[str]) -> list[StoredRecord]:
        rows: dict[str, Any] = {}
        with self.reading() as conn:
            for batch in _batches(enrollment_ids):
                attended = select(_GA.c.group_id).where(_GA.c.enrollment_id.in_(batch))
                query = select(*_REC_COLUMNS).where(_REC.c.kind == GROUP_SESSION, _REC.c.id.in_(attended))
                rows.update((r.id, r) for r in conn.execute(query).all())
        return _oldest_first(rows.values())

    def stay_keys(self, kinds: Iterable[str], enrollment_ids: Iterable[str]) -> dict[str, tuple[int, ...]]:
        # Two aggregates per batch, read from the rows' version and updated columns, never their content.
        wanted = list(kinds)
        own_fields = _key_fields(_REC)
        found: dict[str, tuple[int, ...]] = {}
        with self.reading() as conn:
            for batch in _batches(enrollment_ids):
                own = (
                    select(_REC.c.enrollment_id, *own_fields)
                    .where(_REC.c.kind.in_(wanted), _REC.c.enrollment_id.in_(batch))
                    .group_by(_REC.c.enrollment_id)
                )
                groups = (
                    select(_GA.c.enrollment_id, *own_fields)
                    .select_from(_GA.join(_REC, and_(_REC.c.kind == GROUP_SESSION, _REC.c.id == _GA.c.group_id)))
                    .where(_GA.c.enrollment_id.in_(batch))
                    .group_by(_GA.c.enrollment_id)
                )
                of_own = {row[0]: tuple(int(v) for v in row[1:]) for row in conn.execute(own)}
                of_groups = {row[0]: tuple(int(v) for v in row[1:]) for row in conn.execute(groups)}
                for eid in batch:
                    found[eid] = of_own.get(eid, _NO_ROWS) + of_groups.get(eid, _NO_ROWS)
        return found

    def current_versions(self, references: Iterable[str]) -> dict[str, int]:
        wanted: dict[str, list[str]] = {}
        for reference in dict.fromkeys(references):
            res_type, _, res_id = reference.partition("/")
            wanted.setdefault(res_type, []).append(res_id)
        found: dict[str, int] = {}
        with self.reading() as conn:
            for res_type, res_ids in wanted.items():
                for batch in _batches(res_ids):
                    query = select(_R.c.res_id, _R.c.version_id).where(
                        _R.c.res_type == res_type, _R.c.res_id.in_(batch)
                    )
                    found.update((f"{res_type}/{row.res_id}", int(row.version_id)) for row in conn.execute(query))
        return found

    # -- inbound referrals

    def referral(self, id: str) -> StoredRecord | None:
        try:
            with self.reading() as conn:
                row = conn.execute(select(*_IR_COLUMNS).where(_IR.c.id == id)).first()
        except self._unreadable_key:
            return None
        return _row_to_referral(row) if row else None

    def referrals(
        self, *, status: str | None = None, offset: int = 0, count: int = 20
    ) -> tuple[list[StoredRecord], int]:
        conditions = [] if status is None else [_IR.c.status == status]
        query = select(*_IR_COLUMNS).where(*conditions).order_by(_IR.c.created, _IR.c.id).limit(count).offset(offset)
        with self.reading() as conn:
            total = conn.execute(select(func.count()).select_from(_IR).where(*conditions)).scalar_one()
            rows = conn.execute(query).all() if count else []
        return [_row_to_referral(r) for r in rows], total

    # -- Subscription event counters

    def subscription_events(self, sub_id: str) -> int | None:
        with self.reading() as conn:
            events = conn.execute(select(_SE.c.events).where(_SE.c.sub_id == sub_id)).scalar_one_or_none()
        return None if events is None else int(events)

    # -- the clients of the token endpoint

    def add_client(self, client: StoredClient) -> bool:
        values = {
            "client_id": client.client_id,
            "name": client.name,
            "jwks": json.dumps(client.jwks, separators=(",", ":")),
            "scope": client.scope,
            "partner_id": client.partner_id,
            "purpose_of_use": client.purpose_of_use,
            "admin": client.admin,
            "consents": client.consents,
            "active": client.active,
            "created": client.created,
        }
        try:
            with self.writing() as conn:
                conn.execute(insert(_AC).values(**values))
        except IntegrityError:
            return False
        return True

    def client(self, client_id: str) -> StoredClient | None:
        with self.reading() as conn:
            row = conn.execute(select(_AC).where(_AC.c.client_id == client_id)).first()
        return _row_to_client(row) if row else None

    def clients(self) -> list[StoredClient]:
        with self.reading() as conn:
            return [_row_to_client(row) for row in conn.execute(select(_AC).order_by(_AC.c.client_id))]

    def disable_client(self, client_id: str) -> bool:
        with self.writing() as conn:
            changed = conn.execute(update(_AC).where(_AC.c.client_id == client_id).values(active=False)).rowcount
        return bool(changed)

    def jti_used(self, client_id: str, jti: str) -> bool:
        query = select(exists().where(_AJ.c.client_id == client_id, _AJ.c.jti == jti))
        with self.reading() as conn:
            return bool(conn.execute(query).scalar())

    def use_jti(self, client_id: str, jti: str, expires_at: int) -> bool:
        # The unique key (client_id, jti) lets only one of the processes accepting the same assertion insert it.
        try:
            with self.writing() as conn:
                conn.execute(insert(_AJ).values(client_id=client_id, jti=jti, expires_at=expires_at))
        except IntegrityError:
            return False
        return True

    def purge_jtis(self, now: int) -> int:
        with self.writing() as conn:
            purged: int = conn.execute(delete(_AJ).where(_AJ.c.expires_at < now)).rowcount
        return purged

    # -- outbox

    def claim(self, worker_id: str, now: int, lease_seconds: float, limit: int) -> list[Delivery]:
        until = now + int(lease_seconds * 1_000_000)
        with self.writing() as conn:
            if self.postgres:
                params = {"now": now, "limit": limit, "worker": worker_id, "until": until}
                rows = conn.execute(_CLAIM_POSTGRES, params).all()
            else:
                # BEGIN IMMEDIATE (the write connection) holds SQLite's one write lock from the select to the
                # update, so two claimers never see the same row as due.
                due = (
                    select(_O.c.id)
                    .where(_O.c.status.in_(("pending", "delivering")), _O.c.next_attempt_at <= now)
                    .order_by(_O.c.next_attempt_at)
                    .limit(limit)
                )
                ids = list(conn.execute(due).scalars())
                if not ids:
                    return []
                conn.execute(
                    update(_O)
                    .where(_O.c.id.in_(ids))
                    .values(
                        status="delivering",
                        attempts=_O.c.attempts + 1,
                        leased_by=worker_id,
                        lease_until=until,
                        next_attempt_at=until,
                        updated=now,
                    )
                )
                rows = conn.execute(select(*_O_COLUMNS).where(_O.c.id.in_(ids))).all()
        return sorted((_row_to_delivery(r) for r in rows), key=lambda d: (d.created, d.id))

    def _held(self, id: str, worker_id: str, values: dict[str, Any]) -> bool:
        """Update a row only while this worker holds it."""
        held = (_O.c.id == id, _O.c.status == "delivering", _O.c.leased_by == worker_id)
        with self.writing() as conn:
            return conn.execute(update(_O).where(*held).values(**values)).rowcount == 1

    def renew(self, id: str, worker_id: str, now: int, lease_seconds: float) -> bool:
        until = now + int(lease_seconds * 1_000_000)
        return self._held(id, worker_id, {"lease_until": until, "next_attempt_at": until, "updated": now})

    def delivered(self, id: str, worker_id: str, now: int, response: dict[str, Any] | None) -> bool:
        body = None if response is None else orjson.dumps(response)
        values = {"status": "delivered", "response": body, "delivered_at": now, "lease_until": None, "updated": now}
        return self._held(id, worker_id, values)

    def failed(self, id: str, worker_id: str, now: int, error: dict[str, Any], next_attempt_at: int | None) -> bool:
        values = {
            "status": "dead" if next_attempt_at is None else "pending",
            "next_attempt_at": now if next_attempt_at is None else next_attempt_at,
            "last_error": orjson.dumps(error),
            "lease_until": None,
            "updated": now,
        }
        return self._held(id, worker_id, values)

    def blocked(self, id: str, worker_id: str, now: int, error: dict[str, Any]) -> bool:
        values = {
            "status": "blocked",
            "attempts": _O.c.attempts - 1,
            "next_attempt_at": now,
            "last_error": orjson.dumps(error),
            "lease_until": None,
            "updated": now,
        }
        return self._held(id, worker_id, values)

    def release(self, worker_id: str, ids: list[str], now: int) -> int:
        if not ids:
            return 0
        held = (_O.c.id.in_(ids), _O.c.status == "delivering", _O.c.leased_by == worker_id)
        values = {
            "status": "pending",
            "attempts": _O.c.attempts - 1,
            "next_attempt_at": now,
            "lease_until": None,
            "updated": now,
        }
        with self.writing() as conn:
            released: int = conn.execute(update(_O).where(*held).values(**values)).rowcount
        return released

    def retry(self, id: str, now: int) -> bool:
        values = {"status": "pending", "next_attempt_at": now, "lease_until": None, "updated": now}
        try:
            with self.writing() as conn:
                stopped = (_O.c.id == id, _O.c.status.in_(RETRYABLE_BY_HAND))
                return conn.execute(update(_O).where(*stopped).values(**values)).rowcount == 1
        except self._unreadable_key:
            return False

    def sync_cursor(self, partner_id: str, patient_id: str, res_type: str) -> str | None:
        key = (_SC.c.partner_id == partner_id, _SC.c.patient_id == patient_id, _SC.c.res_type == res_type)
        with self.reading() as conn:
            value = conn.execute(select(_SC.c.last_updated).where(*key)).scalar_one_or_none()
        return None if value is None else str(value)

    def delivery(self, id: str) -> Delivery | None:
        try:
            with self.reading() as conn:
                row = conn.execute(select(*_O_COLUMNS).where(_O.c.id == id)).first()
        except self._unreadable_key:
            return None
        return _row_to_delivery(row) if row else None

    def deliveries(
        self,
        *,
        partner_id: str | None = None,
        status: str | None = None,
        record_kind: str | None = None,
        record_id: str | None = None,
        offset: int = 0,
        count: int = 20,
    ) -> tuple[list[Delivery], int]:
        conditions = []
        for column, value in (
            (_O.c.partner_id, partner_id),
            (_O.c.status, status),
            (_O.c.record_kind, record_kind),
            (_O.c.record_id, record_id),
        ):
            if value is not None:
                conditions.append(column == value)
        query = select(*_O_COLUMNS).where(*conditions).order_by(_O.c.created, _O.c.id).limit(count).offset(offset)
        try:
            with self.reading() as conn:
                total = conn.execute(select(func.count()).select_from(_O).where(*conditions)).scalar_one()
                rows = conn.execute(query).all() if count else []
        except self._unreadable_key:
            return [], 0
        return [_row_to_delivery(r) for r in rows], total
