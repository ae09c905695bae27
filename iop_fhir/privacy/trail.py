"""The audit trail of API requests: the rows of the audit log (audit.py, auditlog.py) for every read, search, history,
write and delete a client makes, built from what the request's repository calls returned and wrote, never from the
response body.

- What a request writes is audited inside the same database transaction, just before it commits (a change and its
  audit row commit together or not at all): the repository's write hook (``write_hook``) collects what each
  transaction stores.
- What it reads is collected as the repository returns it (``observed``: read, vread, search and every page of
  matches and includes, history, the match of a conditional create; /iop records as the record service returns
  them, ``returned_record``); once the response is ready, ``rows`` turns it into rows, and the guard hands them to
  the audit log: queued (group commit) for the program's own clients, committed before the response is released for
  a client acting for a partner.
- For a partner's client each patient whose records it received gets a row of their own: those rows are the
  accounting of disclosures (GET /iop/enrollments/{id}/disclosures). Every request of a partner's client leaves at
  least one row, one that returned nothing too (an empty search, a count, a 404).
- A refused or failed request (4xx/5xx, not 401) leaves one row with its outcome and the Type/id its URL names.

The trail of the request being served is held in a context variable so that the store's write hook can reach it
without the store or the repository knowing about requests.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any

import orjson

from iop_fhir.fhir.repository import Repository, WriteResult
from iop_fhir.privacy import audit, disclosure
from iop_fhir.r4.instants import now_us
from iop_fhir.security.access import Principal
from iop_fhir.store.base import AuditRow, HistoryCursor, SearchResult, StoredResource, WriteTx

_current: ContextVar[Trail | None] = ContextVar("iop_fhir_audit_trail", default=None)
_TYPE_ID = re.compile(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}")


@dataclass
class Trail:
    """What one request did, as far as its audit is concerned."""

    principal: Principal
    action: str  # an audit.ACTIONS name
    query: str | None = None  # type and parameters of a search, as received
    recorded: set[str] = field(default_factory=set)  # Type/id already in a row of this request (its writes)
    # What the repository returned, in order: Type/id with the stored bytes (patients found when rows are made), or
    # with the patients already known.
    returned: list[tuple[str, bytes | set[str] | None]] = field(default_factory=list)
    _pending: dict[int, tuple[WriteTx, list[tuple[str, set[str]]]]] = field(default_factory=dict)

    @property
    def agent(self) -> audit.Agent:
        agent: audit.Agent = {"client_id": self.principal.client_id}
        if self.principal.recipient:
            agent["partner"] = self.principal.recipient
        if self.principal.purpose:
            agent["purpose"] = self.principal.purpose
        return agent

    @property
    def durable(self) -> bool:
        """Whether the request's rows must be committed before its response is released: a partner's."""
        return self.principal.partner is not None

    def saw(self, resources: Iterable[StoredResource]) -> None:
        """Note versions the repository returned to the client (deletions carry nothing and are left out)."""
        for stored in resources:
            if stored.content is not None:
                self.returned.append((f"{stored.res_type}/{stored.res_id}", stored.content))

    def saw_references(self, references: Iterable[str]) -> None:
        """Note resources the client received by reference only (an /iop record lists those it produced)."""
        for reference in references:
            if _TYPE_ID.fullmatch(reference):
                patient = disclosure.patient_id(reference)
                self.returned.append((reference, {patient} if patient is not None else set()))

    def rows(self, status: int, target: str | None) -> list[AuditRow]:
        """The rows the request leaves once its response (``status``) is ready, beside those its writes committed.
        ``target`` is the Type/id the URL names, if any."""
        outcome = audit.outcome_for_status(status)
        recorded = now_us()
        entities = [target] if target and _TYPE_ID.fullmatch(target) else []
        if outcome != "0":
            return [self._row(outcome, None, entities, recorded)]
        returned = [(ref, _patients(found)) for ref, found in self.returned if ref not in self.recorded]
        if not returned:
            # Nothing read: the write's own row (committed with it) says it all; otherwise the request is still
            # audited (a partner's probe that found nothing, a count, a delete of nothing).
            return [] if self.recorded else [self._row("0", None, entities, recorded)]
        groups: dict[str | None, list[str]] = defaultdict(list)
        if not self.durable:
            patients = set().union(*(p for _, p in returned))
            single = f"Patient/{next(iter(patients))}" if len(patients) == 1 else None
            groups[single] = [ref for ref, _ in returned]
        else:
            # A disclosure is accounted for per patient: one row for each patient whose records went out.
            for ref, patients in returned:
                for patient_id in sorted(patients) or [""]:
                    groups[f"Patient/{patient_id}" if patient_id else None].append(ref)
        return [self._row("0", patient, references, recorded) for patient, references in groups.items()]

    def _row(self, outcome: str, patient: str | None, references: list[str], recorded: int) -> AuditRow:
        return audit.new_row(self.action, outcome, self.agent, patient, references, recorded=recorded, query=self.query)


def begin(trail: Trail) -> Token[Trail | None]:
    return _current.set(trail)


def end(token: Token[Trail | None]) -> None:
    _current.reset(token)


def current() -> Trail | None:
    return _current.get()


def named(action: str) -> None:
    """Name the request's action once its body tells more than its endpoint (a Bundle posted to the base is a batch
    or a transaction)."""
    found = _current.get()
    if found is not None:
        found.action = action


def returned_record(body: Any) -> None:
    """Note the FHIR resources an /iop response names (a record, or a page of them) in the request's trail."""
    trail = _current.get()
    if trail is not None and isinstance(body, Mapping):
        trail.saw_references(_record_references(body))


def _record_references(body: Mapping[str, Any]) -> list[str]:
    refs = [r for r in body.get("fhir") or [] if isinstance(r, str)]
    for item in body.get("items") or []:
        if isinstance(item, Mapping):
            refs += [r for r in item.get("fhir") or [] if isinstance(r, str)]
    return refs


def write_hook(repository: Repository) -> Any:
    """The repository write hook that collects what the request's transaction stores, and adds its audit row to
    that transaction just before it commits."""

    def on_write(tx: WriteTx, resource: dict[str, Any], stored: StoredResource) -> None:
        trail = _current.get()
        if trail is None:
            return
        key = id(tx)
        if key not in trail._pending:
            trail._pending[key] = (tx, [])
            tx.before_commit.append(lambda: _commit(trail, key))
        trail._pending[key][1].append((f"{stored.res_type}/{stored.res_id}", patients_of(resource)))

    return on_write


def _commit(trail: Trail, key: int) -> None:
    tx, written = trail._pending.pop(key)
    references = [reference for reference, _ in written]
    patients = set().union(*(p for _, p in written))
    patient = f"Patient/{next(iter(patients))}" if len(patients) == 1 else None
    tx.append_audit([trail._row("0", patient, references, now_us())])
    trail.recorded.update(references)


class ObservedRepository(Repository):
    """The repository of one audited request: what its reads return is noted in the request's trail. Searches are
    noted where every page of results passes, ``check_included`` (Repository.search, and the searches a transaction
    Bundle runs inside its transaction)."""

    trail: Trail

    def read(self, res_type: str, res_id: str, *, tx: WriteTx | None = None) -> StoredResource:
        stored = super().read(res_type, res_id, tx=tx)
        self.trail.saw([stored])
        return stored

    def vread(self, res_type: str, res_id: str, version: str, *, tx: WriteTx | None = None) -> StoredResource:
        stored = super().vread(res_type, res_id, version, tx=tx)
        self.trail.saw([stored])
        return stored

    def check_included(self, result: SearchResult) -> None:
        super().check_included(result)
        self.trail.saw(result.matches)
        self.trail.saw(result.included)

    def history(
        self,
        res_type: str | None,
        res_id: str | None,
        *,
        since: int | None,
        at: int | None,
        count: int,
        offset: int,
        after: HistoryCursor | None = None,
    ) -> tuple[list[StoredResource], int | None]:
        versions, total = super().history(res_type, res_id, since=since, at=at, count=count, offset=offset, after=after)
        self.trail.saw(versions)
        return versions, total

    def create(self, res_type: str, body: Any, *, if_none_exist: str | None = None) -> WriteResult:
        result = super().create(res_type, body, if_none_exist=if_none_exist)
        if result.unchanged:  # a conditional create that found its match returns it: a read
            self.trail.saw([result.stored])
        return result


def observed(repository: Repository, trail: Trail) -> Repository:
    """``repository`` (as one client sees it) noting what it returns in ``trail``."""
    view = ObservedRepository.__new__(ObservedRepository)
    view.__dict__.update(vars(repository))
    view.trail = trail
    return view


def _patients(found: bytes | set[str] | None) -> set[str]:
    if isinstance(found, set):
        return found
    if not found or b"Patient/" not in found and b'"Patient"' not in found:
        return set()  # refers to no Patient and is none: no need to parse it
    return patients_of(orjson.loads(found))


def patients_of(resource: Any) -> set[str]:
    """The ids of the Patients a resource is about: itself, or every Patient it refers to."""
    if not isinstance(resource, dict):
        return set()
    if resource.get("resourceType") == "Patient" and isinstance(resource.get("id"), str):
        return {resource["id"]}
    found: set[str] = set()
    _collect(resource, found, 0)
    return found


def _collect(node: Any, found: set[str], depth: int) -> None:
    if depth > 64:
        return
    if isinstance(node, dict):
        reference = node.get("reference")
        patient = disclosure.patient_id(reference)
        if patient is not None:
            found.add(patient)
        for key, value in node.items():
            if key != "contained" and isinstance(value, dict | list):
                _collect(value, found, depth + 1)
    elif isinstance(node, list):
        for item in node:
            _collect(item, found, depth + 1)
