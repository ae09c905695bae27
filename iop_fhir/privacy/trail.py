"""The audit trail of API requests: an AuditEvent (audit.py) for every read, search, history, write and delete a
client makes. What a request writes is audited inside the same database transaction, just before it commits (a
change and its audit commit together or not at all); what it reads, and any refusal, once its response is ready. For
a client acting for a partner each patient whose records it received gets an event of their own: those events are
the accounting of disclosures (GET /iop/enrollments/{id}/disclosures).

The trail of the request being served is held in a context variable so that the store's write hook can reach it
without the store or the repository knowing about requests.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any

import orjson

from iop_fhir.fhir.repository import Repository
from iop_fhir.privacy import audit, disclosure
from iop_fhir.r4.instants import instant, now_us
from iop_fhir.security.access import Principal
from iop_fhir.store.base import StoredResource, WriteTx

_current: ContextVar[Trail | None] = ContextVar("iop_fhir_audit_trail", default=None)
_TYPE_ID = re.compile(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}")
MAX_ENTITIES = 1000  # a search page holds at most this many matches and includes each


@dataclass
class Trail:
    """What one request did, as far as its audit is concerned."""

    principal: Principal
    action: str  # an audit.ACTIONS name
    query: str | None = None  # type and parameters of a search, as received
    recorded: set[str] = field(default_factory=set)  # Type/id already in an AuditEvent of this request
    _pending: dict[int, tuple[WriteTx, list[tuple[str, set[str]]]]] = field(default_factory=dict)

    @property
    def agent(self) -> audit.Agent:
        agent: audit.Agent = {"client_id": self.principal.client_id}
        if self.principal.recipient:
            agent["partner"] = self.principal.recipient
        if self.principal.purpose:
            agent["purpose"] = self.principal.purpose
        return agent


def begin(trail: Trail) -> Token[Trail | None]:
    return _current.set(trail)


def end(token: Token[Trail | None]) -> None:
    _current.reset(token)


def current() -> Trail | None:
    return _current.get()


def write_hook(repository: Repository) -> Any:
    """The repository write hook that collects what the request's transaction stores, and writes its AuditEvent
    in that transaction just before it commits."""

    def on_write(tx: WriteTx, resource: dict[str, Any], stored: StoredResource) -> None:
        trail = _current.get()
        if trail is None or stored.res_type == "AuditEvent":
            return
        key = id(tx)
        if key not in trail._pending:
            trail._pending[key] = (tx, [])
            tx.before_commit.append(lambda: _commit(repository, trail, key))
        trail._pending[key][1].append((f"{stored.res_type}/{stored.res_id}", patients_of(resource)))

    return on_write


def _commit(repository: Repository, trail: Trail, key: int) -> None:
    tx, written = trail._pending.pop(key)
    references = [reference for reference, _ in written]
    patients = set().union(*(p for _, p in written))
    patient = f"Patient/{next(iter(patients))}" if len(patients) == 1 else None
    _write(repository, tx, trail, "0", patient, references)


def after_response(repository: Repository, trail: Trail, status: int, body: bytes | None, target: str | None) -> None:
    """Audit what the response gives the client that no in-transaction event covered, or the refusal. ``target``
    is the Type/id the URL names, if any."""
    outcome = audit.outcome_for_status(status)
    if outcome != "0":
        entities = [target] if target and _TYPE_ID.fullmatch(target) else []
        with repository.store.write() as tx:
            _write(repository, tx, trail, outcome, None, entities)
        return
    returned = [(ref, patients) for ref, patients in resources_in(body) if ref not in trail.recorded]
    if not returned:
        if trail.recorded or trail.action not in audit.DISCLOSING:
            return
        returned = [(target, set())] if target and _TYPE_ID.fullmatch(target) else []
    groups: dict[str | None, list[str]] = defaultdict(list)
    if trail.principal.recipient is None:
        patients = set().union(*(p for _, p in returned))
        single = f"Patient/{next(iter(patients))}" if len(patients) == 1 else None
        groups[single] = [ref for ref, _ in returned]
    else:
        # A disclosure is accounted for per patient: one event for each patient whose records went out.
        for ref, patients in returned:
            for patient_id in sorted(patients) or [""]:
                groups[f"Patient/{patient_id}" if patient_id else None].append(ref)
    with repository.store.write() as tx:
        for patient, references in groups.items():
            _write(repository, tx, trail, "0", patient, references)


def _write(
    repository: Repository, tx: WriteTx, trail: Trail, outcome: str, patient: str | None, references: list[str]
) -> None:
    references = list(dict.fromkeys(references))[: 2 * MAX_ENTITIES]
    event = audit.audit_event(
        trail.action,
        outcome,
        trail.agent,
        patient,
        references,
        when=instant(now_us()).replace("+00:00", "Z"),
        query=trail.query,
    )
    repository.create_in(tx, "AuditEvent", event)
    trail.recorded.update(references)


def resources_in(body: bytes | None) -> Iterator[tuple[str, set[str]]]:
    """The Type/id of every resource a response carries (a resource, or the entries of a Bundle), with the
    patients each belongs to; OperationOutcomes and the Bundle itself are not records."""
    if not body:
        return
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return
    for resource in _resources(parsed):
        res_type, res_id = resource.get("resourceType"), resource.get("id")
        if isinstance(res_type, str) and isinstance(res_id, str) and res_type not in ("OperationOutcome", "Bundle"):
            reference = f"{res_type}/{res_id}"
            if _TYPE_ID.fullmatch(reference):
                yield reference, patients_of(resource)


def _resources(parsed: Any) -> Iterable[dict[str, Any]]:
    if not isinstance(parsed, dict):
        return []
    if parsed.get("resourceType") == "Bundle":
        found: list[dict[str, Any]] = []
        for entry in parsed.get("entry") or []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict):
                found.extend(_resources(resource) if resource.get("resourceType") == "Bundle" else [resource])
        return found
    if "resourceType" in parsed:
        return [parsed]
    # An /iop record: the resources it produced are listed by reference.
    refs = [r for r in parsed.get("fhir") or [] if isinstance(r, str)]
    for item in parsed.get("items") or []:
        if isinstance(item, dict):
            refs += [r for r in item.get("fhir") or [] if isinstance(r, str)]
    return [{"resourceType": r.split("/", 1)[0], "id": r.split("/", 1)[1]} for r in refs if "/" in r]


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
