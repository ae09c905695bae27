"""What every store offers: stored FHIR resource versions, IOP records, outbox deliveries, a write transaction, the
index row format."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from iop_fhir.r4.indexing import IndexRows


@dataclass(frozen=True)
class StoredResource:
    """One version of a resource as stored: the JSON bytes are served as they are."""

    res_type: str
    res_id: str
    version_id: int
    last_updated: int  # microseconds since the epoch, UTC
    deleted: bool
    content: bytes | None  # None for a deletion
    method: str | None = None  # for history entries: POST, PUT, PATCH or DELETE


@dataclass(frozen=True)
class StoredRecord:
    """One IOP record (/iop) as stored: the record as loaded, and the FHIR resources it produced."""

    kind: str  # enrollment, assessment, treatment-plan, session, consent, discharge, partner
    id: str
    enrollment_id: str | None
    status: str  # active | entered-in-error
    version: int
    content: dict[str, Any]  # the record as loaded
    resources: list[dict[str, str]]  # [{"role": ..., "reference": "Type/id"}, ...]
    created: int  # microseconds since the epoch, UTC
    updated: int


# Outbox statuses: pending (due at next_attempt_at) -> delivering (claimed by a worker until its lease ends) ->
# delivered, or pending again after a retryable failure, or dead (permanent failure, attempts exhausted). blocked:
# enqueued but not to be sent (no consent permits it) until a consent releases it or an operator retries it.
# superseded: replaced by a newer row for the same record and partner (a consent released it rebuilt); kept, never
# sent. Only dead and blocked rows can be retried by hand.
DELIVERY_STATUSES = ("pending", "delivering", "delivered", "dead", "blocked", "superseded")
RETRYABLE_BY_HAND = ("dead", "blocked")


@dataclass(frozen=True)
class Delivery:
    """One outbox row: a payload for one partner, where its delivery stands, and what the partner last answered."""

    id: str
    partner_id: str
    record_kind: str  # the kind of record the payload comes from (enrollment, discharge, ...)
    record_id: str | None
    kind: str  # bundle | notification
    payload: dict[str, Any]  # {"method", "url", "body"}; for a bundle url "" and body the transaction Bundle
    status: str  # one of DELIVERY_STATUSES
    attempts: int  # deliveries started (claims), including one in progress
    next_attempt_at: int  # microseconds since the epoch, UTC; while delivering, the lease expiry
    created: int
    updated: int
    lease_until: int | None = None
    leased_by: str | None = None
    last_error: dict[str, Any] | None = None  # DeliveryError.to_json() shape; the partner's OperationOutcome in it
    response: dict[str, Any] | None = None  # summary of the partner's answer (entry statuses, locations)
    delivered_at: int | None = None


@dataclass
class SearchResult:
    """What a search found: the page of matches, what _include/_revinclude added, and the total if asked."""

    matches: list[StoredResource] = field(default_factory=list)
    included: list[StoredResource] = field(default_factory=list)
    total: int | None = None
    has_more: bool = False


class WriteTx(Protocol):
    """One database transaction. Everything done through it commits together or not at all."""

    # Called once the transaction's body has succeeded, in the transaction, just before it commits.
    before_commit: list[Callable[[], None]]

    def lock(self, key: str) -> None:
        """Serialise with every other transaction that locks the same key, until this one ends."""

    def current(self, res_type: str, res_id: str) -> StoredResource | None:
        """The current version (deleted or not), locked against concurrent writers until the transaction ends."""

    def reserve(self, res_type: str, res_id: str) -> None:
        """Declare a server-assigned id as new, so that save() needs no current() first."""

    def save(
        self,
        version: StoredResource,
        index: IndexRows,
    ) -> None:
        """Store a new version (create or update) and replace the resource's search index."""

    def delete(self, res_type: str, res_id: str, version_id: int, last_updated: int) -> None:
        """Record a deletion as a new version and drop the resource's search index."""

    def search(self, request: Any) -> SearchResult:
        """Run a parsed search (r4/search.py) inside this transaction."""

    def record(self, kind: str, id: str, *, lock: bool = True) -> StoredRecord | None:
        """The stored record; with ``lock``, serialised with every other writer of it until the transaction ends."""

    def save_record(self, record: StoredRecord) -> None:
        """Insert the record, or replace the stored one with the same kind and id."""

    def enqueue(self, delivery: Delivery) -> None:
        """Add an outbox row; it becomes visible to workers when (and only if) this transaction commits."""

    def deliveries_to(self, partner_id: str, statuses: tuple[str, ...]) -> list[Delivery]:
        """The partner's outbox rows in one of ``statuses``, oldest first, locked against workers and other writers
        until the transaction ends (a worker's claim skips them)."""

    def set_delivery_status(
        self, id: str, expected: tuple[str, ...], status: str, last_error: dict[str, Any] | None, now: int
    ) -> bool:
        """Move a row that is still in one of ``expected`` to ``status`` with ``last_error``, due now; False if it
        was not (a worker claimed it meanwhile)."""

    def type_state(self, res_type: str) -> tuple[int, int | None]:
        """How many versions of resources of a type were ever stored, and when the newest was: it changes with every
        create, update and delete of that type (a cheap check that a cache of them still holds)."""

    def save_sync_cursor(self, partner_id: str, patient_id: str, res_type: str, last_updated: str, now: int) -> None:
        """Set how far sync has stored a partner's resources of one type for one patient (the partner's
        meta.lastUpdated, as written), in the transaction that stored them."""


class Store(Protocol):
    def read(self, res_type: str, res_id: str) -> StoredResource | None: ...

    def vread(self, res_type: str, res_id: str, version_id: int) -> StoredResource | None: ...

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
        restriction: Any = None,
    ) -> tuple[list[StoredResource], int]: ...

    def search(self, request: Any) -> SearchResult: ...

    def record(self, kind: str, id: str) -> StoredRecord | None: ...

    def records(
        self, kind: str, *, enrollment_id: str | None = None, offset: int = 0, count: int = 20
    ) -> tuple[list[StoredRecord], int]:
        """A page of records of one kind (of one enrollment if given), oldest first, and the total."""

    def write(self) -> AbstractContextManager[WriteTx]: ...

    def claim(self, worker_id: str, now: int, lease_seconds: float, limit: int) -> list[Delivery]:
        """Lease up to ``limit`` due rows to one worker: pending rows whose next attempt is due and delivering rows
        whose lease expired. Each becomes delivering, attempts + 1, leased until now + lease_seconds. No row is ever
        leased to two workers at once."""

    def renew(self, id: str, worker_id: str, now: int, lease_seconds: float) -> bool:
        """Extend this worker's lease of a row to now + lease_seconds; False if the row passed to another worker."""

    def delivered(self, id: str, worker_id: str, now: int, response: dict[str, Any] | None) -> bool:
        """Mark a row this worker holds delivered; False (nothing changed) if its lease passed to another worker."""

    def failed(self, id: str, worker_id: str, now: int, error: dict[str, Any], next_attempt_at: int | None) -> bool:
        """Record a failed attempt: pending again at ``next_attempt_at``, or dead when that is None. False (nothing
        changed) if the row's lease passed to another worker."""

    def blocked(self, id: str, worker_id: str, now: int, error: dict[str, Any]) -> bool:
        """Mark a row this worker holds blocked without having sent it (its consent no longer permits it): attempts
        as before the claim, ``error`` kept as the last error. False if the lease passed to another worker."""

    def release(self, worker_id: str, ids: list[str], now: int) -> int:
        """Give back rows this worker claimed but did not attempt (on shutdown): pending, due now, attempts as before
        the claim. Returns how many were released."""

    def retry(self, id: str, now: int) -> bool:
        """Make a dead or blocked row pending and due now (attempts kept); False if it is not dead or blocked."""

    def sync_cursor(self, partner_id: str, patient_id: str, res_type: str) -> str | None:
        """The partner's meta.lastUpdated up to which sync has stored its resources of this type and patient."""

    def delivery(self, id: str) -> Delivery | None: ...

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
        """A page of outbox rows, oldest first, and the total."""

    def close(self) -> None: ...
