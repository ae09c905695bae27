"""The audit log (store/base.py AuditLog, AuditLogTx) in the table ``audit_log``: mixed into SqlStore and SqlWriteTx.

A row is one INSERT, batched: the rows of a group commit (privacy/auditlog.py) go in one statement and one short
transaction on a plain DBAPI connection of their own (as the store's reads by id do, sql.py _DirectReads: the
thread commits every few milliseconds, and SQLAlchemy's checkout, compilation and events would cost it more than the
inserts), those of a write in the write's own transaction. Searches run on the indexes by date, patient, client and
partner; a search by entity reads the rows' JSON list (``LIKE '%"Type/id"%'``), bounded by whatever else the search
names.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from sqlalchemy import ColumnElement, Connection, Engine, and_, false, func, insert, or_, select

from iop_fhir.store import schema, writerlock
from iop_fhir.store.base import AUDIT_FIELDS, AuditQuery, AuditRow

_A = schema.audit_log
_COLUMNS = tuple(_A.c)
_NAMES = ", ".join(c.name for c in _COLUMNS)
# A batch is one statement with one parameter, the rows as JSON: one statement to prepare (cached), one step, so the
# thread hands the GIL to the request threads once per batch rather than once per row (executemany). A single
# statement in autocommit mode is a transaction of its own on both databases, and SQLite's busy handler covers it as
# it covers BEGIN IMMEDIATE.
_INSERT_SQLITE = (
    f"INSERT INTO audit_log ({_NAMES}) SELECT "
    + ", ".join(f"json_extract(value, '$[{n}]')" for n in range(len(_COLUMNS)))
    + " FROM json_each(?)"
)
_INSERT_POSTGRES = (
    f"INSERT INTO audit_log ({_NAMES}) SELECT {_NAMES} FROM json_populate_recordset(NULL::audit_log, %s::json)"
)


def _values(row: AuditRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "recorded": row.recorded,
        "action": row.action,
        "outcome": row.outcome,
        "client_id": row.client_id,
        "on_behalf_of": row.on_behalf_of,
        "purpose": row.purpose,
        "patient": row.patient,
        "entities": orjson.dumps(list(row.entities)).decode(),
        "query": row.query,
    }


def _row(found: Any) -> AuditRow:
    return AuditRow(
        id=found.id,
        recorded=found.recorded,
        action=found.action,
        outcome=found.outcome,
        client_id=found.client_id,
        on_behalf_of=found.on_behalf_of,
        purpose=found.purpose,
        patient=found.patient,
        entities=tuple(orjson.loads(found.entities)),
        query=found.query,
    )


def append(conn: Connection, rows: Sequence[AuditRow]) -> None:
    if rows:
        conn.execute(insert(_A), [_values(row) for row in rows])


def dbapi_connection(engine: Engine) -> Any:
    """A plain DBAPI connection of the engine's database in autocommit mode (each statement its own transaction),
    for the single-statement paths that skip SQLAlchemy: the audit log's appends and reads by primary key."""
    dialect = engine.dialect
    cargs, cparams = dialect.create_connect_args(engine.url)
    if dialect.name == "sqlite":
        cparams.update(check_same_thread=False, timeout=60, isolation_level=None)
    else:
        cparams["autocommit"] = True
    return dialect.loaded_dbapi.connect(*cargs, **cparams)


class _DirectAppends:
    """Batches of rows, each one statement (a transaction of its own) on one DBAPI connection kept for them
    (reconnected after an error, and in a child process after a fork)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"
        self.sql = _INSERT_SQLITE if self.sqlite else _INSERT_POSTGRES
        self._lock = threading.Lock()
        self._conn: Any = None
        self._pid = 0

    def _connect(self) -> Any:
        return dbapi_connection(self.engine)

    def append(self, rows: Sequence[AuditRow]) -> None:
        values = [_values(row) for row in rows]
        # SQLite reads the columns by position, PostgreSQL by name.
        batch = orjson.dumps([[v[c.name] for c in _COLUMNS] for v in values] if self.sqlite else values)
        with self._lock:
            if self._conn is None or self._pid != os.getpid():
                self._conn, self._pid = self._connect(), os.getpid()
            conn = self._conn
            try:
                with writerlock.writing(self.engine):
                    cursor = conn.cursor()
                    cursor.execute(self.sql, (batch.decode(),))
                    cursor.close()
            except Exception:
                self._conn = None
                with contextlib.suppress(Exception):  # already failing: the first error is the one raised
                    conn.close()
                raise

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


def _alternative(field: str, value: str) -> ColumnElement[bool]:
    if field not in AUDIT_FIELDS:
        raise ValueError(f"unknown audit log field {field!r}")  # programming error, never user input
    if field == "entity":
        # The patient is an entity of the rendered event too.
        return or_(_A.c.patient == value, _A.c.entities.contains(orjson.dumps(value).decode(), autoescape=True))
    column: ColumnElement[Any] = _A.c[field]
    return column == value


def _conditions(query: AuditQuery) -> list[ColumnElement[bool]]:
    found: list[ColumnElement[bool]] = []
    for alternatives in query.where:
        found.append(or_(*(_alternative(field, value) for field, value in alternatives)) if alternatives else false())
    for ranges in query.recorded:
        options: list[ColumnElement[bool]] = []
        for low, high in ranges:
            bounds = [_A.c.recorded >= low] if low is not None else []
            bounds += [_A.c.recorded <= high] if high is not None else []
            options.append(and_(*bounds) if bounds else _A.c.recorded.is_not(None))
        found.append(or_(*options) if options else false())
    if query.partners_only:
        found.append(_A.c.on_behalf_of.is_not(None))
    return found


def search(conn: Connection, query: AuditQuery) -> tuple[list[AuditRow], int | None]:
    conditions = _conditions(query)
    order = (_A.c.recorded, _A.c.id) if query.oldest_first else (_A.c.recorded.desc(), _A.c.id.desc())
    rows: list[AuditRow] = []
    if query.count > 0:
        page = list(conditions)
        if query.after is not None:  # keyset: rows are never changed once written, so no page repeats or skips one
            recorded, id = query.after
            if query.oldest_first:
                page += [_A.c.recorded >= recorded, or_(_A.c.recorded > recorded, _A.c.id > id)]
            else:
                page += [_A.c.recorded <= recorded, or_(_A.c.recorded < recorded, _A.c.id < id)]
        statement = select(*_COLUMNS).where(*page).order_by(*order).limit(query.count).offset(query.offset)
        rows = [_row(found) for found in conn.execute(statement)]
    total = None
    if query.total:
        total = conn.execute(select(func.count()).select_from(_A).where(*conditions)).scalar_one()
    return rows, total


class SqlAuditLog:
    """AuditLog on the store's engine (a base of SqlStore)."""

    engine: Engine

    def when_closing(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` when the store closes, before its connections go (the audit log's writer of the process
        commits the rows it holds)."""
        self.__dict__.setdefault("_when_closing", []).append(hook)

    def closing(self) -> None:
        for hook in self.__dict__.pop("_when_closing", []):
            hook()
        direct = self.__dict__.pop("_audit_appends", None)
        if direct is not None:
            direct.close()

    def append_audit(self, rows: Sequence[AuditRow]) -> None:
        if not rows:
            return
        if str(self.engine.url) in ("sqlite://", "sqlite:///:memory:"):
            # One database per connection: only the engine's own connection sees it.
            with (
                writerlock.writing(self.engine),
                self.engine.connect().execution_options(iop_write=True) as conn,
                conn.begin(),
            ):
                append(conn, rows)
            return
        direct: _DirectAppends | None = self.__dict__.get("_audit_appends")
        if direct is None:
            direct = self.__dict__.setdefault("_audit_appends", _DirectAppends(self.engine))
        direct.append(rows)

    def audit_row(self, id: str) -> AuditRow | None:
        with self.engine.connect() as conn, conn.begin():
            found = conn.execute(select(*_COLUMNS).where(_A.c.id == id)).first()
        return _row(found) if found is not None else None

    def audit_rows(self, query: AuditQuery) -> tuple[list[AuditRow], int | None]:
        with self.engine.connect() as conn, conn.begin():
            return search(conn, query)

    def audit_page(
        self,
        after: str | None,
        limit: int,
        *,
        since: int | None,
        until: int | None,
        patients: tuple[str, ...] | None = None,
        any_patient: bool = False,
    ) -> list[AuditRow]:
        conditions: list[ColumnElement[bool]] = []
        if after is not None:
            conditions.append(_A.c.id > after)
        if since is not None:
            conditions.append(_A.c.recorded > since)
        if until is not None:
            conditions.append(_A.c.recorded <= until)
        if patients is not None:
            conditions.append(_A.c.patient.in_(patients))
        elif any_patient:
            conditions.append(_A.c.patient.is_not(None))
        statement = select(*_COLUMNS).where(*conditions).order_by(_A.c.id).limit(limit)
        with self.engine.connect() as conn, conn.begin():
            return [_row(found) for found in conn.execute(statement)]


class SqlAuditLogTx:
    """AuditLogTx in the write transaction's connection (a base of SqlWriteTx)."""

    conn: Connection

    def append_audit(self, rows: Sequence[AuditRow]) -> None:
        append(self.conn, rows)
