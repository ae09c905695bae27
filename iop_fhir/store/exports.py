"""Bulk Data export jobs as fhir/export.py sees them: the job, its files and chunks, the compartment a page is read
from, and ExportJobs, what keeps them (store/export_sql.py over the SQL store's database)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from iop_fhir.r4.search import Visibility
from iop_fhir.store.base import StoredResource, WriteTx

STATUSES = ("queued", "running", "completed", "failed")


@dataclass(frozen=True)
class ExportJob:
    """One $export job as stored."""

    id: str
    client_id: str
    principal: dict[str, Any]  # what Access is rebuilt from: client_id, scope, partner, purpose, admin
    request: str  # the kick-off URL
    params: dict[str, Any]  # fhir/export.ExportRequest as JSON
    status: str  # one of STATUSES
    exported: int = 0
    transaction_time: int | None = None
    cursor: dict[str, Any] | None = None
    error: str | None = None
    attempts: int = 0
    lease_until: int | None = None
    leased_by: str | None = None
    created: int = 0
    updated: int = 0
    expires: int | None = None
    consented: dict[str, list[str]] | None = None  # a partner's job: {"patients": [...], "notes": [...]}


@dataclass(frozen=True)
class ExportFile:
    """One file of a job's manifest: its number (in the download URL), output or error, type and line count."""

    number: int
    kind: str  # output | error
    res_type: str
    lines: int


@dataclass(frozen=True)
class Chunk:
    """Whole NDJSON lines appended to one file of a job."""

    file_no: int
    chunk_no: int
    res_type: str
    kind: str
    lines: int
    content: bytes


@dataclass(frozen=True)
class Compartment:
    """Resources in the Patient compartment (compartment.py) of ``patients`` (None: of any live Patient), through
    the reference parameters ``params`` (for Patient itself: the patient, or its ``link``)."""

    params: tuple[str, ...]
    patients: tuple[str, ...] | None = None


class LeaseLost(Exception):
    """The job was deleted (cancelled) or passed to another process: this one must stop working on it."""


class ExportJobs(Protocol):
    """Export jobs, their leases and their NDJSON chunks, and the pages of resources a job reads, in a database that
    every process of the service may share.

    A job is leased like an outbox row: no job runs in two processes at once, and one whose lease expired (its process
    died) is claimed again. Each chunk is stored in a write transaction of ``write()`` (with the audit rows of what
    it discloses) that first re-checks the lease."""

    def add(self, job: ExportJob) -> None:
        """Store a new job: queued, or already running under its creator's lease (an export run in process)."""

    def job(self, job_id: str) -> ExportJob | None: ...

    def claim(self, worker_id: str, lease_seconds: float, job_id: str | None = None) -> ExportJob | None:
        """Lease the oldest queued job (or ``job_id``), or one whose lease expired: running, attempts + 1, its
        transaction time set on its first run. None if there is none free."""

    def write(self) -> AbstractContextManager[WriteTx]:
        """A write transaction of the store, for a chunk with the audit rows of what it discloses."""

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
        """Append ``chunk`` and move the job's cursor (and, if given, the consents it runs under) in ``tx`` (one of
        ``write()``), extending its lease; LeaseLost (and the transaction must roll back) if the job is no longer this
        worker's."""

    def finish(self, job_id: str, worker_id: str, status: str, *, error: str | None, expires: int) -> bool:
        """Mark a job this worker holds completed or failed, kept until ``expires``; False if it no longer holds it."""

    def delete(self, job_id: str) -> bool:
        """Remove a job and its files (a cancelled or expired job); False if there was none."""

    def purge(self, now: int) -> int:
        """Delete every job (and its files) kept past its expiry; returns how many."""

    def files(self, job_id: str) -> list[ExportFile]: ...

    def chunks(self, job_id: str, file_no: int) -> list[int]:
        """The chunk numbers of one file, in order (empty: no such file)."""

    def chunk(self, job_id: str, file_no: int, chunk_no: int) -> bytes | None: ...

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

    def patients(self, res_type: str, res_ids: Sequence[str]) -> dict[str, set[str]]:
        """The Patients each resource of a page (ids in order) belongs to, as the Part 2 predicate decides it: those
        it refers to through an indexed reference, and a Patient itself."""
