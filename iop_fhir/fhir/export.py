"""Bulk Data export (https://hl7.org/fhir/uv/bulkdata/export.html, v2): the kick-off parameters, the jobs that write
NDJSON of what the requesting client may see, the status and the manifest.

A job runs in a background thread of the process that accepted it, and `iop-fhir worker` runs every job that is queued
or whose process died (its lease expired); jobs and their files live in the database, so any process on it serves any
job, and a job taken over resumes at the chunk where it stopped. A job sees exactly what its client sees through /fhir
search: the types its scopes let it read (AuditEvent only for administrators), and for a partner's client the Part 2
restriction (privacy/disclosure.py), decided again from the consents in force when the job runs. What goes to a
partner carries the redisclosure mark, as every /fhir response to it does, and its job keeps the patients whose
consents it ran under: once one of those consents no longer permits the disclosure (revoked, ended), the files not yet
fetched are deleted rather than served (still_consented). Each chunk is audited in the transaction that stores it: for
a partner one row of the audit log per patient whose records it holds, as privacy/trail.py audits reads (a job's
files are made for its client alone, so writing them is the disclosure). AuditEvents, for administrators, are the
audit log's rows rendered as they are at /fhir/AuditEvent.
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from iop_fhir.config import Settings
from iop_fhir.errors import BadRequest, FhirError, Forbidden, Gone, Issue, NotFound, operation_outcome
from iop_fhir.fhir import searchset
from iop_fhir.fhir.operation import short
from iop_fhir.privacy import audit, disclosure
from iop_fhir.privacy.restriction import Restriction
from iop_fhir.r4 import definitions
from iop_fhir.r4.compartment import patient_compartment
from iop_fhir.r4.indexing import date_range
from iop_fhir.r4.instants import instant, now_us
from iop_fhir.security.access import Access, Principal
from iop_fhir.security.scopes import Scopes
from iop_fhir.store import leases
from iop_fhir.store.base import WriteTx
from iop_fhir.store.export_sql import ExportDatabase, ExportStore
from iop_fhir.store.exports import Chunk, Compartment, ExportJob, ExportJobs, LeaseLost

if TYPE_CHECKING:
    from iop_fhir.fhir.repository import Repository

log = logging.getLogger(__name__)

LEVELS = ("system", "patient", "group")
OUTPUT_FORMATS = frozenset({"application/fhir+ndjson", "application/ndjson", "ndjson"})
# Kick-off parameters of the specification this server does not implement: 400, or ignored with handling=lenient
# when ignoring them can only export less than asked; those that narrow the export (_typeFilter) are always 400,
# so that an export never silently holds more than its client asked for.
NOT_SUPPORTED = ("_typeFilter", "includeAssociatedData")
NARROWING = frozenset({"_typeFilter", "patient"})
_KNOWN = frozenset({"_outputFormat", "_type", "_since", "_format", "patient", "_elements", *NOT_SUPPORTED})
MAX_PATIENTS = 1000  # patient references in one kick-off
_ELEMENT = re.compile(r"(?:([A-Z][A-Za-z]*)\.)?([A-Za-z][A-Za-z0-9_]*)\Z")
_INSTANT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})\Z")
_JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
PAGE = 1000  # resources read, and stored as one chunk, at a time: at most this many,
CHUNK_BYTES = 2 * 1024 * 1024  # and no more than fit in this (but at least one), so that memory stays flat
AUDIT_EVENT = "AuditEvent"  # exported from the audit log, rendered (privacy/audit.py), never stored as resources
MAX_ATTEMPTS = 3  # runs of a job that never finished (its process died) before it is given up as failed
RETRY_AFTER_S = 2
NDJSON = "application/fhir+ndjson"


@dataclass(frozen=True)
class ExportRequest:
    """What a kick-off asked for: level (system, patient or group), the Group, the types (None: every type the
    client may read, of the Patient compartment below system level), changes since (µs), parameters ignored, the
    patients whose compartments it holds (``patient``; None: every patient of its level), the elements to keep
    (``_elements``, each ``name`` or ``Type.name``; None: whole resources)."""

    level: str
    group: str | None = None
    types: tuple[str, ...] | None = None
    since: int | None = None
    ignored: tuple[str, ...] = ()
    patients: tuple[str, ...] | None = None
    elements: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExportRequest:
        types = data.get("types")
        return cls(
            level=data["level"],
            group=data.get("group"),
            types=None if types is None else tuple(types),
            since=data.get("since"),
            ignored=tuple(data.get("ignored") or ()),
            patients=None if data.get("patients") is None else tuple(data["patients"]),
            elements=None if data.get("elements") is None else tuple(data["elements"]),
        )

    def elements_of(self, res_type: str) -> tuple[str, ...] | None:
        """The top-level elements ``_elements`` keeps of ``res_type`` (besides the mandatory ones, ``id`` and
        ``meta``), or None if it was not given: an element without a type applies to every type."""
        if self.elements is None:
            return None
        found = []
        for element in self.elements:
            type_name, _, name = element.rpartition(".")
            if type_name in ("", res_type):
                found.append(name)
        return tuple(found)


def compartment_types() -> frozenset[str]:
    return frozenset(patient_compartment())


def parse(
    level: str,
    params: list[tuple[str, str]],
    *,
    lenient: bool = False,
    group: str | None = None,
    references: frozenset[int] = frozenset(),
) -> ExportRequest:
    """Validate the kick-off parameters (pure). Malformed or unknown values are a 400 naming the parameter (its
    ``expression``); parameters this server does not implement too (``not-supported``), unless ``lenient`` and
    ignoring them cannot export more than asked, when they are listed in ``ignored`` and the job says so in an
    informational OperationOutcome of its error file. ``references`` holds the positions in ``params`` of the values
    that came as a Reference (``valueReference`` of a POST's Parameters): ``patient`` is one, never a query
    parameter."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}")
    types: list[str] | None = None
    since: int | None = None
    ignored: list[str] = []
    patients: list[str] | None = None
    elements: list[str] | None = None
    for position, (name, value) in enumerate(params):
        if name == "patient":
            patients = _patient(level, value, patients or [], from_reference=position in references)
            continue
        if name == "_elements":
            elements = elements or []
            elements.extend(e for e in _elements(value) if e not in elements)
            continue
        if name in ("_outputFormat", "_since"):
            value = value.replace(" ", "+")  # a "+" sent unencoded arrives as a space; neither value holds one
        if name == "_outputFormat":
            if value not in OUTPUT_FORMATS:
                raise BadRequest(
                    f"_outputFormat '{short(value)}' is not supported; use application/fhir+ndjson",
                    "_outputFormat",
                    code="not-supported",
                )
        elif name == "_type":
            types = types or []
            for res_type in (t.strip() for t in value.split(",")):
                if not res_type:
                    continue
                if res_type not in definitions.resource_types():
                    raise BadRequest(f"_type: '{short(res_type)}' is not an R4 resource type", "_type")
                if level != "system" and res_type not in compartment_types():
                    if lenient:
                        ignored.append(f"_type={res_type}")
                        continue
                    raise BadRequest(
                        f"_type: {res_type} is not in the Patient compartment, the only types a {level}-level "
                        "export holds",
                        "_type",
                        code="not-supported",
                    )
                if res_type not in types:
                    types.append(res_type)
        elif name == "_since":
            since = _since(value)
        elif name == "_format":
            continue  # checked with the Accept header by the view
        elif lenient and name not in NARROWING:
            ignored.append(name)
        elif name in _KNOWN:
            raise BadRequest(f"{name} is not supported by this server's $export", name, code="not-supported")
        else:
            raise BadRequest(f"'{short(name)}' is not a parameter of $export", name, code="not-supported")
    return ExportRequest(
        level,
        group,
        None if types is None else tuple(types),
        since,
        tuple(ignored),
        None if patients is None else tuple(patients),
        None if elements is None else tuple(elements),
    )


def _patient(level: str, value: str, patients: list[str], *, from_reference: bool) -> list[str]:
    """``patient``: a Reference to a Patient, in a POST's Parameters (valueReference), at Patient or Group level."""
    if level == "system":
        raise BadRequest(
            "patient applies to Patient and Group level exports only (POST /fhir/Patient/$export)",
            "patient",
            code="not-supported",
        )
    if not from_reference:
        raise BadRequest(
            "patient is a Reference: send it as valueReference of a Parameters body in a POST kick-off "
            '({"name": "patient", "valueReference": {"reference": "Patient/<id>"}})',
            "patient",
            code="not-supported",
        )
    patient = disclosure.patient_id(value) if value.startswith(("Patient/", "http")) else None
    if patient is None:
        raise BadRequest(f"patient '{short(value)}' is not a reference to a Patient such as Patient/123", "patient")
    if patient not in patients:
        if len(patients) >= MAX_PATIENTS:
            raise BadRequest(f"patient: at most {MAX_PATIENTS} patients in one export", "patient")
        patients.append(patient)
    return patients


def _elements(value: str) -> list[str]:
    """``_elements``: comma-separated top-level elements, each ``name`` or ``Type.name``."""
    found = []
    for element in (e.strip() for e in value.split(",")):
        if not element:
            continue
        match = _ELEMENT.match(element)
        if match is None or (match.group(1) and match.group(1) not in definitions.resource_types()):
            raise BadRequest(
                f"_elements: '{short(element)}' is not a top-level element such as Patient.name or name",
                "_elements",
            )
        found.append(element)
    return found


def _since(value: str) -> int:
    error = BadRequest(f"_since '{short(value)}' is not a FHIR instant such as 2026-01-01T00:00:00Z", "_since")
    if not _INSTANT.match(value):
        raise error
    try:
        return date_range(value)[0]
    except ValueError:
        raise error from None


def reference_parameters(body: Any) -> frozenset[int]:
    """The positions, among ``operation.parameters(body)``, of the values that are a Reference (``valueReference``)."""
    listed = body.get("parameter") if isinstance(body, dict) else None
    return frozenset(
        index
        for index, p in enumerate(listed if isinstance(listed, list) else [])
        if isinstance(p, dict) and "valueReference" in p
    )


def respond_async(prefer: str | None) -> bool:
    """Whether a Prefer header (RFC 7240) carries ``respond-async``."""
    return any(part.split("=", 1)[0].strip() == "respond-async" for part in (prefer or "").replace(";", ",").split(","))


# -- who asked ------------------------------------------------------------------------------------------------


def principal_json(principal: Principal) -> dict[str, Any]:
    """What the job keeps of its client to rebuild its Access when it runs."""
    return {
        "client_id": principal.client_id,
        "scope": str(principal.scopes),
        "partner": principal.partner,
        "purpose": principal.purpose,
        "admin": principal.admin,
    }


def principal_from(data: dict[str, Any]) -> Principal:
    return Principal(
        client_id=data["client_id"],
        scopes=Scopes.parse(data["scope"]),
        partner=data.get("partner"),
        purpose=data.get("purpose"),
        admin=bool(data.get("admin")),
    )


def readable_types(request: ExportRequest, access: Access) -> list[str]:
    """The types the job exports: those asked for (or, if none were, every type of its level), each only if the
    client's scopes permit $export of it."""
    if request.types is not None:
        candidates = set(request.types)
    elif request.level == "system":
        candidates = set(definitions.resource_types())
    else:
        candidates = set(compartment_types())
    return sorted(t for t in candidates if access.allows(t, "$export"))


# -- the API's service functions -------------------------------------------------------------------------------


def kick_off(exporter: Exporter, access: Access, repository: Repository, request: ExportRequest, url: str) -> str:
    """Queue a job for the client behind ``access`` and start it; returns its id."""
    authorize(access, repository, request)
    job = new_job(access.principal, request, url)
    exporter.jobs.add(job)
    exporter.kick()
    return job.id


def authorize(access: Access, repository: Repository, request: ExportRequest) -> None:
    """403 if ``_type`` names a type the client may not read (or it may read none), 404 if the Group is not one it
    can see (``repository`` acts for the client)."""
    if request.types is not None:
        for res_type in request.types:
            access.require(res_type, "$export")
    elif not readable_types(request, access):
        raise Forbidden("the access token permits exporting no resource type; that needs a scope system/<type>.rs")
    if request.group is not None:
        repository.read("Group", request.group)


def new_job(principal: Principal, request: ExportRequest, url: str) -> ExportJob:
    return ExportJob(
        id=str(uuid.uuid4()),
        client_id=principal.client_id,
        principal=principal_json(principal),
        request=url,
        params=request.to_json(),
        status="queued",
        created=now_us(),
    )


def owned(exporter: Exporter, principal: Principal, job_id: str) -> ExportJob:
    """The job, if it is this client's and not expired; 404 otherwise, whether or not another client's exists."""
    job = exporter.jobs.job(job_id) if _JOB_ID.fullmatch(job_id) else None
    if job is not None and job.expires is not None and job.expires <= now_us():
        exporter.jobs.delete(job.id)
        job = None
    if job is None or job.client_id != principal.client_id:
        raise NotFound(f"there is no export job '{short(job_id)}'")
    return job


def poll(exporter: Exporter, access: Access, job_id: str) -> ExportJob:
    """The client's job, as its status URL shows it. A job that waits for a runner (queued, or its process died) is
    started here too, so that it needs no worker to finish."""
    job = still_consented(exporter, access, owned(exporter, access.principal, job_id))
    if job.status == "queued" or (job.status == "running" and (job.lease_until or 0) <= now_us()):
        exporter.kick()
    return job


def still_consented(exporter: Exporter, access: Access, job: ExportJob) -> ExportJob:
    """The job, unless a consent it ran under no longer permits disclosure to the client (revoked, ended, replaced
    by a deny): then its files have not been received and must not be, so the job and its files are deleted (410).
    Consents given since the job ran change nothing; the client starts a new export for those patients."""
    if job.consented is None or access.restriction is None:
        return job
    now = access.restriction
    if set(job.consented["patients"]) <= now.patients and set(job.consented["notes"]) <= now.note_patients:
        return job
    exporter.jobs.delete(job.id)
    raise Gone(
        f"export job {job.id} was made under a consent that no longer permits this disclosure (revoked or ended "
        "since); the job and its files are deleted: start a new export"
    )


def consented(held: dict[str, list[str]] | None, restriction: Restriction) -> dict[str, list[str]]:
    """What a partner's job records of the consents it runs under: this run's patients with those of earlier runs
    (their chunks are among its files too)."""
    patients = set(restriction.patients).union((held or {}).get("patients", ()))
    notes = set(restriction.note_patients).union((held or {}).get("notes", ()))
    return {"patients": sorted(patients), "notes": sorted(notes)}


def cancel(exporter: Exporter, principal: Principal, job_id: str) -> None:
    """Delete the client's job and its files; a run in progress stops at its next chunk, storing nothing more."""
    exporter.jobs.delete(owned(exporter, principal, job_id).id)


def progress(job: ExportJob, access: Access) -> str:
    """The X-Progress of a job still waiting or running, a percentage first (clients read a leading number as
    one): the share of its types done, the type being exported counted as half done, and never 100% before the
    manifest is there. ``access`` is its client's, who decides the types (readable_types)."""
    if job.status == "queued":
        return "0% (queued)"
    cursor = job.cursor or {}
    current = cursor.get("type")
    types = readable_types(ExportRequest.from_json(job.params), access)
    done: float = sum(
        1 for t in types if current is not None and (t < current or (t == current and cursor.get("done")))
    )
    if current in types and not cursor.get("done"):
        done += 0.5
    percent = min(99, int(100 * done / len(types))) if types else 99
    where = f", now {current}" if current else ""
    return f"{percent}% ({job.exported:,} resources exported{where})"


def manifest(exporter: Exporter, job: ExportJob, base_url: str) -> dict[str, Any]:
    """The complete job's manifest (https://hl7.org/fhir/uv/bulkdata/export.html#response---complete-status)."""
    assert job.transaction_time is not None

    def item(file: Any) -> dict[str, Any]:
        return {"type": file.res_type, "url": f"{base_url}/$export-file/{job.id}/{file.number}", "count": file.lines}

    files = exporter.jobs.files(job.id)
    return {
        "transactionTime": instant(job.transaction_time),
        "request": job.request,
        "requiresAccessToken": True,
        "output": [item(f) for f in files if f.kind == "output"],
        "error": [item(f) for f in files if f.kind == "error"],
    }


def failure(job: ExportJob) -> FhirError:
    """The 500 a failed job's status answers."""
    return FhirError(job.error or "the export job failed", code="exception")


def file_chunks(exporter: Exporter, access: Access, job_id: str, file_no: int) -> Iterator[bytes]:
    """The NDJSON of one file of the client's complete job, chunk by chunk (one chunk in memory at a time); 404 if
    there is none, 410 if the consents it was made under no longer permit it (still_consented)."""
    job = still_consented(exporter, access, owned(exporter, access.principal, job_id))
    numbers = exporter.jobs.chunks(job.id, file_no) if job.status == "completed" else []
    if not numbers:
        raise NotFound(f"export job {job.id} has no file {file_no}")

    def stream() -> Iterator[bytes]:
        for number in numbers:
            content = exporter.jobs.chunk(job.id, file_no, number)
            if content is None:  # deleted while downloading
                return
            yield content

    return stream()


# -- in process (`iop-fhir export`) ---------------------------------------------------------------------------

# The service itself, as an administrator reading every type: what `iop-fhir export` runs as.
SERVICE = Principal(client_id="iop-fhir-export", scopes=Scopes.parse("system/*.rs"), admin=True)


def export_to_folder(
    exporter: Exporter,
    request: ExportRequest,
    folder: Path,
    *,
    on_chunk: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Run an export in this process as SERVICE, with the same job code as the API (``exporter`` runs jobs in the
    caller's thread), write its files into ``folder`` (``Patient.ndjson``, ``Patient.2.ndjson``, ..., errors as
    ``errors.ndjson``) and delete the job. Returns the manifest with a ``path`` for each file instead of a ``url``."""
    store, settings = exporter.store, exporter.settings
    access = Access(SERVICE, store)
    authorize(access, exporter.repository.acting_for(access), request)
    since = instant(request.since) if request.since is not None else ""
    query = "&".join(f"{k}={v}" for k, v in (("_type", ",".join(request.types or ())), ("_since", since)) if v)
    path = {"system": "$export", "patient": "Patient/$export", "group": f"Group/{request.group}/$export"}
    url = f"{settings.base_url.rstrip('/')}/{path[request.level]}" + (f"?{query}" if query else "")
    now = now_us()
    job = replace(
        new_job(SERVICE, request, url),
        status="running",
        transaction_time=now,
        attempts=1,
        leased_by=exporter.worker_id,
        lease_until=now + int(exporter.lease * 1_000_000),
    )
    exporter.jobs.add(job)
    try:
        exporter.run(job, on_chunk=on_chunk)
        finished = exporter.jobs.job(job.id)
        if finished is None or finished.status != "completed":
            raise failure(finished or job)
        result: dict[str, Any] = {"transactionTime": instant(now), "request": url, "output": [], "error": []}
        seen: dict[str, int] = defaultdict(int)
        for file in exporter.jobs.files(job.id):
            name = file.res_type if file.kind == "output" else "errors"
            seen[name] += 1
            target = folder / (f"{name}.ndjson" if seen[name] == 1 else f"{name}.{seen[name]}.ndjson")
            with target.open("wb") as out:
                for number in exporter.jobs.chunks(job.id, file.number):
                    out.write(exporter.jobs.chunk(job.id, file.number, number) or b"")
            result[file.kind].append({"type": file.res_type, "path": str(target), "count": file.lines})
        return result
    finally:
        exporter.jobs.delete(job.id)


# -- running jobs -----------------------------------------------------------------------------------------------


class JobFailed(Exception):
    """The job cannot be done as asked (its Group is gone); the message is what its status answers."""


@dataclass(frozen=True)
class Cursor:
    """Where a job stands, stored with each chunk: the type being exported and the last id done, the file it is
    writing, how many files it has made, how many resources it has exported."""

    type: str | None = None
    after: str | None = None
    done: bool = False  # the type is finished
    file: int | None = None
    lines: int = 0
    chunk: int = 0
    files: int = 0
    exported: int = 0

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Cursor:
        return cls(**data) if data else cls()


class Exporter:
    """Runs export jobs: in one background thread of the serving process after each kick-off (``kick``), and in
    `iop-fhir worker` (``run_due``)."""

    def __init__(
        self,
        store: ExportDatabase,
        settings: Settings,
        *,
        repository: Repository,
        background: bool = True,
        worker: str | None = None,
    ) -> None:
        self.jobs: ExportJobs = ExportStore(store)
        self.store = store
        self.settings = settings
        self.file_lines = max(1, settings.export_file_lines)
        self.lease = float(settings.worker_lease_seconds)
        self.background = background
        self.worker_id = worker or leases.holder_name()
        self.repository = repository  # reads the Group of a Group-level export
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def kick(self) -> None:
        """Make sure the background thread runs (it takes queued jobs until there are none)."""
        if not self.background:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, name="iop-fhir-export", daemon=True)
                self._thread.start()

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the background thread to run out of jobs."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _drain(self) -> None:
        try:
            while True:
                # Under the lock: a kick-off that finds the thread alive can count on it to look once more.
                with self._lock:
                    job = self.jobs.claim(self.worker_id, self.lease)
                    if job is None:
                        self._thread = None
                        return
                self.run(job)
        except Exception as error:  # the database went away: the jobs wait for the next kick-off, poll or worker
            log.error("export: the background thread stopped: %s", type(error).__name__)
            with self._lock:
                self._thread = None

    def run_due(self, stop: Callable[[], bool] | None = None) -> int:
        """Delete expired jobs, then run every job that is queued or whose lease expired; how many were run."""
        self.jobs.purge(now_us())
        ran = 0
        while not (stop is not None and stop()):
            job = self.jobs.claim(self.worker_id, self.lease)
            if job is None:
                break
            self.run(job, stop=stop)
            ran += 1
        return ran

    def run(
        self,
        job: ExportJob,
        *,
        on_chunk: Callable[[str, int], None] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        """Run a job this worker has claimed to its end: completed, or failed if the job itself failed. A job
        cancelled or taken over meanwhile is left alone; on ``stop`` it is left for another run to resume."""
        try:
            if job.attempts > MAX_ATTEMPTS:
                raise JobFailed(f"gave up after {job.attempts - 1} runs that never finished")
            _Run(self, job, on_chunk, stop)()
        except LeaseLost:
            log.info("export %s: cancelled or taken over; stopped", job.id)
            return
        except _Stopped:
            log.info("export %s: stopped; another run resumes it once its lease ends", job.id)
            return
        except JobFailed as error:
            self._finish(job, "failed", str(error))
            return
        except Exception as error:
            # An arbitrary exception's message may quote resource content (PHI): its type and frames only.
            log.error(
                "export %s: unexpected %s\n%s",
                job.id,
                type(error).__name__,
                "".join(traceback.format_tb(error.__traceback__)),
            )
            self._finish(job, "failed", f"the export failed ({type(error).__name__}); start a new one")
            return
        self._finish(job, "completed", None)

    def _finish(self, job: ExportJob, status: str, error: str | None) -> None:
        expires = now_us() + self.settings.export_retention * 1_000_000
        if self.jobs.finish(job.id, self.worker_id, status, error=error, expires=expires):
            log.info("export %s: %s", job.id, status)


class _Stopped(Exception):
    """The job was cancelled or its lease lost while it ran: stop without finishing it."""


class _Run:
    """One run of one job, holding the cursor of what is committed."""

    def __init__(
        self,
        exporter: Exporter,
        job: ExportJob,
        on_chunk: Callable[[str, int], None] | None,
        stop: Callable[[], bool] | None,
    ) -> None:
        self.exporter = exporter
        self.jobs = exporter.jobs
        self.job = job
        self.on_chunk = on_chunk
        self.stop = stop
        self.request = ExportRequest.from_json(job.params)
        self.principal = principal_from(job.principal)
        self.access = Access(self.principal, exporter.store)
        self.cursor = Cursor.from_json(job.cursor)
        self.consented: dict[str, list[str]] | None = None  # to store with the next chunk (still_consented)
        self.agent: audit.Agent = {"client_id": self.principal.client_id}
        if self.principal.recipient:
            self.agent["partner"] = self.principal.recipient
        if self.principal.purpose:
            self.agent["purpose"] = self.principal.purpose

    def __call__(self) -> None:
        # Decided now, from the consents in force today, not those of the kick-off.
        restriction = self.access.restriction
        if restriction is not None:  # stored with this run's first chunk
            self.consented = consented(self.job.consented, restriction)
        first = self.cursor.files == 0 and self.cursor.type is None  # the job's first run: it writes the notes
        members = self._members() if self.request.group is not None else None
        notes: list[Issue] = []
        if self.request.patients is not None:
            members = self._asked_patients(members, notes)
        if self.request.ignored:
            ignored = ", ".join(self.request.ignored)
            notes.append(Issue("informational", f"ignored (not supported): {ignored}", severity="information"))
        if notes and first:
            self._error_file(None, *notes)
        for res_type in readable_types(self.request, self.access):
            current = self.cursor.type
            if current is not None and (res_type < current or (res_type == current and self.cursor.done)):
                continue
            if res_type != current:
                self.cursor = replace(self.cursor, type=res_type, after=None, done=False, file=None, lines=0, chunk=0)
            compartment = None
            if self.request.level != "system":
                compartment = Compartment(patient_compartment()[res_type], members)
            try:
                self._export_type(res_type, compartment, restriction)
            except (LeaseLost, _Stopped):
                raise
            except Exception as error:
                log.error("export %s: %s failed: %s", self.job.id, res_type, type(error).__name__)
                message = f"exporting {res_type} failed ({type(error).__name__}); its output may be incomplete"
                self._error_file(res_type, Issue("exception", message))

    def _members(self) -> tuple[str, ...]:
        """The Group's Patients now (``member.entity``, leaving out inactive members), if the client can see it."""
        assert self.request.group is not None
        try:
            stored = self.exporter.repository.acting_for(self.access).read("Group", self.request.group)
        except FhirError:
            raise JobFailed(f"Group/{self.request.group} is no longer there") from None
        group = orjson.loads(stored.content or b"{}")
        found: dict[str, None] = {}
        for member in group.get("member") or []:
            if isinstance(member, dict) and member.get("inactive") is not True:
                patient = disclosure.patient_id((member.get("entity") or {}).get("reference"))
                if patient is not None:
                    found[patient] = None
        return tuple(found)

    def _asked_patients(self, members: tuple[str, ...] | None, notes: list[Issue]) -> tuple[str, ...]:
        """The patients ``patient`` names that the client can see (and, at Group level, members of the Group). One
        it cannot see is told exactly as one that does not exist, in ``notes`` (for the error file)."""
        assert self.request.patients is not None
        repository = self.exporter.repository.acting_for(self.access)
        found: list[str] = []
        for patient in self.request.patients:
            try:
                repository.read("Patient", patient)
                known = members is None or patient in members
            except FhirError:
                known = False
            if known:
                found.append(patient)
            else:
                where = "" if self.request.group is None else f" among the members of Group/{self.request.group}"
                notes.append(Issue("not-found", f"patient: there is no Patient/{patient}{where}", severity="warning"))
        return tuple(found)

    def _export_type(self, res_type: str, compartment: Compartment | None, restriction: Any) -> None:
        partner = self.principal.partner is not None
        elements = self.request.elements_of(res_type)
        lines_per_file = self.exporter.file_lines
        while True:
            if self.stop is not None and self.stop():
                raise _Stopped
            cursor = self.cursor
            new_file = cursor.file is None or cursor.lines >= lines_per_file
            limit = min(PAGE, lines_per_file if new_file else lines_per_file - cursor.lines)
            if res_type == AUDIT_EVENT:
                if restriction is not None:  # never a partner's (AuditEvent is for administrators)
                    break
                ids, lines, disclosed = self._audit_page(cursor.after, limit, compartment)
            else:
                page = self.jobs.page(
                    res_type,
                    cursor.after,
                    limit,
                    since=self.request.since,
                    until=self.job.transaction_time,
                    compartment=compartment,
                    restriction=restriction,
                    max_bytes=CHUNK_BYTES,
                )
                ids = [stored.res_id for stored in page]
                content = [stored.content or b"{}" for stored in page]
                if elements is not None:  # meta (the Part 2 labels among it) is always kept
                    content = [searchset.subset(c, res_type, None, elements) for c in content]
                lines = [disclosure.mark_disclosed(c) for c in content] if partner else content
                patients = self.jobs.patients(res_type, ids)
                disclosed = [(f"{res_type}/{res_id}", patients[res_id]) for res_id in ids]
            if not ids:
                break
            page_size = len(ids)
            if new_file:
                cursor = replace(cursor, file=cursor.files + 1, files=cursor.files + 1, lines=0, chunk=0)
            file_no = cursor.file or cursor.files
            cursor = replace(
                cursor,
                after=ids[-1],
                lines=cursor.lines + page_size,
                chunk=cursor.chunk + 1,
                exported=cursor.exported + page_size,
            )
            chunk = Chunk(file_no, cursor.chunk, res_type, "output", page_size, b"\n".join(lines) + b"\n")
            self._commit(cursor, chunk, disclosed)

    def _audit_page(
        self, after: str | None, limit: int, compartment: Compartment | None
    ) -> tuple[list[str], list[bytes], list[tuple[str, set[str]]]]:
        """The next AuditEvents of the export: rows of the audit log by id, rendered (the audit log is not among the
        stored resources); at Patient or Group level those about a patient of the compartment."""
        members = compartment.patients if compartment is not None else None
        rows = self.exporter.store.audit_page(
            after,
            limit,
            since=self.request.since,
            until=self.job.transaction_time,
            patients=tuple(f"Patient/{m}" for m in members) if members is not None else None,
            any_patient=compartment is not None,
        )
        lines = [orjson.dumps(audit.render(row)) for row in rows]
        elements = self.request.elements_of(AUDIT_EVENT)
        if elements is not None:
            lines = [searchset.subset(line, AUDIT_EVENT, None, elements) for line in lines]
        return [row.id for row in rows], lines, [(f"{AUDIT_EVENT}/{row.id}", set()) for row in rows]

    def _error_file(self, res_type: str | None, *issues: Issue) -> None:
        files = self.cursor.files + 1
        cursor = replace(self.cursor, files=files, done=res_type is not None)
        content = orjson.dumps(operation_outcome(list(issues))) + b"\n"
        self._commit(cursor, Chunk(files, 1, "OperationOutcome", "error", 1, content), [])

    def _commit(self, cursor: Cursor, chunk: Chunk | None, disclosed: list[tuple[str, set[str]]]) -> None:
        with self.jobs.write() as tx:
            self.jobs.save_chunk(
                tx,
                self.job.id,
                self.exporter.worker_id,
                self.exporter.lease,
                chunk,
                cursor=asdict(cursor),
                exported=cursor.exported,
                consented=self.consented,
            )
            self._audit(tx, disclosed)
        self.cursor = cursor
        self.consented = None
        if chunk is not None and chunk.kind == "output" and self.on_chunk is not None:
            self.on_chunk(chunk.res_type, chunk.lines)

    def _audit(self, tx: WriteTx, disclosed: list[tuple[str, set[str]]]) -> None:
        """The chunk's audit rows, in its transaction, grouped as privacy/trail.py groups a response: for a partner
        one per patient whose records the chunk holds, otherwise one (naming the patient if there is only one)."""
        if not disclosed:
            return
        groups: dict[str | None, list[str]] = defaultdict(list)
        if self.principal.recipient is None:
            patients = set().union(*(p for _, p in disclosed))
            single = f"Patient/{next(iter(patients))}" if len(patients) == 1 else None
            groups[single] = [reference for reference, _ in disclosed]
        else:
            for reference, patients in disclosed:
                for patient_id in sorted(patients) or [""]:
                    groups[f"Patient/{patient_id}" if patient_id else None].append(reference)
        when = now_us()
        tx.append_audit(
            [audit.new_row("export", "0", self.agent, patient, refs, recorded=when) for patient, refs in groups.items()]
        )
