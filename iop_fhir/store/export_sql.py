"""The SQL of Bulk Data export jobs (ExportJobs of store/exports.py, for fhir/export.py): job rows and their leases,
the NDJSON chunks, and the keyset pages of resources an export reads, under the same Part 2 predicate as every search
(privacy/restriction.py).

A job is claimed the way outbox rows are: on PostgreSQL ``FOR UPDATE SKIP LOCKED``, on SQLite inside ``BEGIN
IMMEDIATE`` (the one writer), so no job runs in two processes at once; a job whose lease expired (its process died)
is claimed again. Every chunk is stored by a transaction that first re-checks the lease: a job deleted or taken over
meanwhile stores nothing more.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

import orjson
from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    bindparam,
    delete,
    exists,
    false,
    func,
    insert,
    or_,
    select,
    true,
    update,
)

from iop_fhir.r4.instants import now_us
from iop_fhir.r4.search import Visibility, is_id
from iop_fhir.store import schema
from iop_fhir.store.base import AuditLog, ResourceStore, StoredResource, WriteTx
from iop_fhir.store.exports import Chunk, Compartment, ExportFile, ExportJob, LeaseLost
from iop_fhir.store.sql import SqlWriteTx

_J = schema.export_jobs
_F = schema.export_files
_R = schema.resources
_REF = schema.idx_reference
_J_COLUMNS = tuple(_J.c)


class ExportDatabase(ResourceStore, AuditLog, Protocol):
    """The store an exporter is given (SqlStore): its resources and audit log, the write transactions a chunk is
    stored in with its audit rows, and short transactions on the same database for the job and chunk rows."""

    def write(self) -> AbstractContextManager[WriteTx]: ...

    def reading(self) -> AbstractContextManager[Connection]: ...

    def writing(self) -> AbstractContextManager[Connection]: ...


def _job(row: Any) -> ExportJob:
    return ExportJob(
        id=row.id,
        client_id=row.client_id,
        principal=orjson.loads(row.principal),
        request=row.request,
        params=orjson.loads(row.params),
        status=row.status,
        exported=row.exported,
        transaction_time=row.transaction_time,
        cursor=None if row.cursor is None else orjson.loads(row.cursor),
        error=row.error,
        attempts=row.attempts,
        lease_until=row.lease_until,
        leased_by=row.leased_by,
        created=row.created,
        updated=row.updated,
        expires=row.expires,
        consented=None if row.consented is None else orjson.loads(row.consented),
    )


def _ids(values: Sequence[str]) -> Any:
    """Patient ids rendered into the statement (a Group may have more members than SQLite binds parameters);
    only FHIR ids are ever given here."""
    assert all(is_id(v) for v in values)
    return bindparam(None, list(values), expanding=True, literal_execute=True)


class ExportStore:
    """ExportJobs in the database of a SqlStore, which any process of the service may share."""

    def __init__(self, store: ExportDatabase) -> None:
        self.store = store

    def add(self, job: ExportJob) -> None:
        """Store a new job: queued, or already running under its creator's lease (an export run in process)."""
        values = {
            "id": job.id,
            "client_id": job.client_id,
            "principal": orjson.dumps(job.principal).decode(),
            "request": job.request,
            "params": orjson.dumps(job.params).decode(),
            "status": job.status,
            "transaction_time": job.transaction_time,
            "exported": 0,
            "attempts": job.attempts,
            "lease_until": job.lease_until,
            "leased_by": job.leased_by,
            "created": job.created,
            "updated": job.created,
        }
        with self.store.writing() as conn:
            conn.execute(insert(_J).values(**values))

    def job(self, job_id: str) -> ExportJob | None:
        with self.store.reading() as conn:
            row = conn.execute(select(*_J_COLUMNS).where(_J.c.id == job_id)).first()
        return _job(row) if row else None

    def claim(self, worker_id: str, lease_seconds: float, job_id: str | None = None) -> ExportJob | None:
        """Lease the oldest queued job (or ``job_id``), or one whose lease expired: running, attempts + 1, its
        transaction time set on its first run. None if there is none free."""
        with self.store.writing() as conn:
            # Taken inside the transaction: on SQLite every writer is serialised behind BEGIN IMMEDIATE, so a write
            # that commits after this moment also stamped its resources after it.
            now = now_us()
            due = or_(_J.c.status == "queued", and_(_J.c.status == "running", _J.c.lease_until <= now))
            query = select(_J.c.id).where(due).order_by(_J.c.created, _J.c.id).limit(1)
            if job_id is not None:
                query = query.where(_J.c.id == job_id)
            found = conn.execute(query.with_for_update(skip_locked=True)).scalar_one_or_none()
            if found is None:
                return None
            conn.execute(
                update(_J)
                .where(_J.c.id == found)
                .values(
                    status="running",
                    attempts=_J.c.attempts + 1,
                    leased_by=worker_id,
                    lease_until=now + int(lease_seconds * 1_000_000),
                    transaction_time=func.coalesce(_J.c.transaction_time, now),
                    updated=now,
                )
            )
            row = conn.execute(select(*_J_COLUMNS).where(_J.c.id == found)).one()
        return _job(row)

    @contextmanager
    def write(self) -> Iterator[WriteTx]:
        """A write transaction of the store, for a chunk with the audit rows of what it discloses."""
        with self.store.write() as tx:
            yield tx

    def save_chunk(
        self,
        tx: WriteTx,
        job_id: str,
        worker_id: str,
        lease_seconds: float,
        chunk: Chunk | None,
        *,
        cursor: dict[str, Any],
        exported: int,
        consented: dict[str, list[str]] | None = None,
    ) -> None:
        """Append ``chunk`` and move the job's cursor (and, if given, the consents it runs under), extending its
        lease; LeaseLost (and the transaction must roll back) if the job is no longer this worker's."""
        if not isinstance(tx, SqlWriteTx):  # programming error: a transaction of another store
            raise TypeError("save_chunk needs a transaction of write()")
        now = now_us()
        held = (_J.c.id == job_id, _J.c.status == "running", _J.c.leased_by == worker_id)
        values = {
            "cursor": orjson.dumps(cursor).decode(),
            "exported": exported,
            "lease_until": now + int(lease_seconds * 1_000_000),
            "updated": now,
        }
        if consented is not None:
            values["consented"] = orjson.dumps(consented).decode()
        if tx.conn.execute(update(_J).where(*held).values(**values)).rowcount != 1:
            raise LeaseLost(job_id)
        if chunk is not None:
            tx.conn.execute(
                insert(_F).values(
                    job_id=job_id,
                    file_no=chunk.file_no,
                    chunk_no=chunk.chunk_no,
                    res_type=chunk.res_type,
                    kind=chunk.kind,
                    lines=chunk.lines,
                    content=chunk.content,
                )
            )

    def finish(self, job_id: str, worker_id: str, status: str, *, error: str | None, expires: int) -> bool:
        """Mark a job this worker holds completed or failed, kept until ``expires``; False if it no longer holds it."""
        held = (_J.c.id == job_id, _J.c.status == "running", _J.c.leased_by == worker_id)
        values = {"status": status, "error": error, "expires": expires, "lease_until": None, "updated": now_us()}
        with self.store.writing() as conn:
            return bool(conn.execute(update(_J).where(*held).values(**values)).rowcount == 1)

    def delete(self, job_id: str) -> bool:
        """Remove a job and its files (a cancelled or expired job); False if there was none."""
        with self.store.writing() as conn:
            # The job row first: on PostgreSQL its lock orders this after a chunk being stored, and that chunk's rows
            # are then deleted too.
            removed = conn.execute(delete(_J).where(_J.c.id == job_id)).rowcount
            conn.execute(delete(_F).where(_F.c.job_id == job_id))
        return bool(removed)

    def purge(self, now: int) -> int:
        """Delete every job (and its files) kept past its expiry; returns how many."""
        with self.store.reading() as conn:
            ids = list(conn.execute(select(_J.c.id).where(_J.c.expires <= now)).scalars())
        return sum(self.delete(job_id) for job_id in ids)

    def files(self, job_id: str) -> list[ExportFile]:
        query = (
            select(_F.c.file_no, _F.c.kind, _F.c.res_type, func.sum(_F.c.lines))
            .where(_F.c.job_id == job_id)
            .group_by(_F.c.file_no, _F.c.kind, _F.c.res_type)
            .order_by(_F.c.file_no)
        )
        with self.store.reading() as conn:
            return [ExportFile(n, kind, res_type, int(lines)) for n, kind, res_type, lines in conn.execute(query)]

    def chunks(self, job_id: str, file_no: int) -> list[int]:
        """The chunk numbers of one file, in order (empty: no such file)."""
        query = select(_F.c.chunk_no).where(_F.c.job_id == job_id, _F.c.file_no == file_no).order_by(_F.c.chunk_no)
        with self.store.reading() as conn:
            return list(conn.execute(query).scalars())

    def chunk(self, job_id: str, file_no: int, chunk_no: int) -> bytes | None:
        key = (_F.c.job_id == job_id, _F.c.file_no == file_no, _F.c.chunk_no == chunk_no)
        with self.store.reading() as conn:
            content = conn.execute(select(_F.c.content).where(*key)).scalar_one_or_none()
        return None if content is None else bytes(content)

    def page(
        self,
        res_type: str,
        after: str | None,
        limit: int,
        *,
        since: int | None,
        until: int | None,
        compartment: Compartment | None,
        restriction: Visibility | None,
        max_bytes: int | None = None,
    ) -> list[StoredResource]:
        """The next live resources of a type by id after ``after``, changed after ``since`` and not after ``until``,
        in ``compartment`` if given, and visible under ``restriction`` exactly as to a search: at most ``limit``,
        and no more than fit in ``max_bytes`` (but at least one), so that a page of large resources stays small."""
        r = _R
        where: list[ColumnElement[bool]] = [r.c.res_type == res_type, r.c.deleted == false()]
        if after is not None:
            where.append(r.c.res_id > after)
        if since is not None:
            where.append(r.c.last_updated > since)
        if until is not None:
            where.append(r.c.last_updated <= until)
        if compartment is not None:
            where.append(_in_compartment(res_type, compartment, r))
        if restriction is not None:
            where.append(restriction.clause(r))
        with self.store.reading() as conn:
            if max_bytes is not None:
                sizes = select(r.c.res_id, func.length(r.c.content)).where(*where).order_by(r.c.res_id).limit(limit)
                taken, total, last = 0, 0, None
                for res_id, size in conn.execute(sizes):
                    if taken and total + size > max_bytes:
                        break
                    taken, total, last = taken + 1, total + size, res_id
                if last is None:
                    return []
                where.append(r.c.res_id <= last)
                limit = taken
            query = (
                select(r.c.res_type, r.c.res_id, r.c.version_id, r.c.last_updated, r.c.content)
                .where(*where)
                .order_by(r.c.res_id)
                .limit(limit)
            )
            rows = conn.execute(query).all()
        return [
            StoredResource(x.res_type, x.res_id, x.version_id, x.last_updated, False, bytes(x.content)) for x in rows
        ]

    def patients(self, res_type: str, res_ids: Sequence[str]) -> dict[str, set[str]]:
        """The Patients each resource of a page (ids in order) belongs to, as the Part 2 predicate decides it
        (privacy/restriction.py): those it refers to through an indexed reference, and a Patient itself."""
        found: dict[str, set[str]] = {res_id: {res_id} if res_type == "Patient" else set() for res_id in res_ids}
        if not res_ids:
            return found
        # The page's id range rather than its 1,000 ids: one short cached statement on the (res_type, res_id) index;
        # rows of ids in the range that are not in the page are passed over.
        query = select(_REF.c.res_id, _REF.c.target_id).where(
            _REF.c.res_type == res_type,
            _REF.c.res_id >= res_ids[0],
            _REF.c.res_id <= res_ids[-1],
            _REF.c.target_type == "Patient",
            _REF.c.target_id.is_not(None),
        )
        with self.store.reading() as conn:
            for res_id, patient in conn.execute(query):
                if res_id in found:
                    found[res_id].add(patient)
        return found


def _in_compartment(res_type: str, compartment: Compartment, r: Any) -> ColumnElement[bool]:
    patient = _R.alias("patient")
    if compartment.patients is None:
        live = select(patient.c.res_id).where(patient.c.res_type == "Patient", patient.c.deleted == false())
        targets: ColumnElement[bool] = _REF.c.target_id.in_(live)
    else:
        targets = _REF.c.target_id.in_(_ids(compartment.patients))
    refers = exists(
        select(_REF.c.res_id).where(
            _REF.c.res_type == res_type,
            _REF.c.res_id == r.c.res_id,
            _REF.c.param.in_(compartment.params),
            _REF.c.target_type == "Patient",
            targets,
        )
    )
    if res_type != "Patient":
        return refers
    if compartment.patients is None:
        return true()  # every live Patient is in its own compartment
    return or_(r.c.res_id.in_(_ids(compartment.patients)), refers)
