"""What the store holds, and what it offers as small protocols by concern: FHIR resource versions and their search
index (ResourceStore, ResourceTx), IOP records (RecordStore, RecordTx), inbound referrals (Referrals, ReferralTx),
outbox deliveries (Outbox, OutboxTx), sync cursors (SyncCursors, SyncCursorTx), Subscription event counters
(SubscriptionEvents, SubscriptionEventTx), the audit log (AuditLog, AuditLogTx) and the clients of the token endpoint
(ClientTables). A caller that uses one concern types against its protocol; ``Store`` and ``WriteTx`` are their union,
for the Repository, whose transaction every write hook and record hook receives. Export jobs have their own protocol
(store/exports.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Protocol

from iop_fhir.r4.indexing import IndexRows
from iop_fhir.r4.search import Cursor

# resources.owner of a resource that belongs to several Patients: never a FHIR id (letters, digits, '-', '.').
MANY_OWNERS = "*"


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
class HistoryCursor:
    """Where the next page of a history starts (the ``_cursor`` of its next link): the time its first page was read
    (``snapshot``: later pages count and hold only versions written by then), how many entries were served before,
    and the order keys of the last one (newest first: last_updated, version_id descending, then type and id)."""

    snapshot: int
    served: int
    last_updated: int
    version_id: int
    res_type: str
    res_id: str


@dataclass(frozen=True)
class VersionFacts:
    """What Part 2 visibility needs of one version, kept beside it (privacy/visibility.py computes them): the
    Patients it belongs to (None: a Patient reference that names no local id), and whether it carries a protected
    label or the counseling-note label. A deletion keeps the facts of the version it deleted."""

    patients: tuple[str | None, ...] = ()
    protected: bool = False
    note: bool = False

    @property
    def owner(self) -> str | None:
        """The one Patient the version belongs to; None when it belongs to none, ``MANY_OWNERS`` when to several or
        to a Patient reference that names no local id (then version_patients decides)."""
        if not self.patients:
            return None
        if len(self.patients) == 1 and self.patients[0] is not None:
            return self.patients[0]
        return MANY_OWNERS


@dataclass(frozen=True)
class StoredRecord:
    """One IOP record (/iop) as stored: the record as loaded, and the FHIR resources it produced."""

    kind: str  # enrollment, assessment, treatment-plan, session, consent, discharge, partner; REFERRAL
    id: str
    enrollment_id: str | None
    status: str  # active | entered-in-error
    version: int
    content: dict[str, Any]  # the record as loaded
    resources: list[dict[str, str]]  # [{"role": ..., "reference": "Type/id"}, ...]
    created: int  # microseconds since the epoch, UTC
    updated: int


# The kind of an inbound referral read as a StoredRecord (Referrals): outbox rows name it as their record_kind.
REFERRAL = "referral"

# The field each kind a stay is found by is dated by (RecordStore.enrollments_during): an enrollment's admission, a
# discharge's day; the store keeps that day on the record's row.
DATED_BY = {"enrollment": "admission_date", "discharge": "discharge_date"}
GROUP_SESSION = "group-session"


def day_of(value: Any) -> date | None:
    """The date a record writes (``2026-01-07`` or the local date of ``2026-01-07T18:00:00-05:00``), else None."""
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        return None


def record_day(kind: str, content: dict[str, Any]) -> str | None:
    """The day (ISO) a record of a kind in DATED_BY is dated on, as the outcomes read it; None for other kinds or a
    date that cannot be read."""
    field_name = DATED_BY.get(kind)
    day = day_of(content.get(field_name)) if field_name is not None else None
    return day.isoformat() if day is not None else None


def attendees(kind: str, content: dict[str, Any]) -> list[str]:
    """The enrollments a group session record names as attendees (each once); none for other kinds."""
    if kind != GROUP_SESSION:
        return []
    found = (a.get("enrollment_id") for a in content.get("attendees") or () if isinstance(a, dict))
    return list(dict.fromkeys(e for e in found if isinstance(e, str)))


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
    included_cut: bool = False  # _include/_revinclude found more than a page includes (r4/search.py MAX_INCLUDED)
    total: int | None = None
    has_more: bool = False
    next_cursor: Cursor | None = None  # where the next page starts, when the store pages by cursor


@dataclass(frozen=True)
class StoredClient:
    """A client of the token endpoint as stored: the public JWKS it signs assertions with, the most it may be granted,
    and what every token of it says (partner, purpose of use, admin, consent management)."""

    client_id: str
    name: str
    jwks: dict[str, Any]
    scope: str  # space-separated SMART scopes
    partner_id: str | None
    purpose_of_use: str | None
    admin: bool
    active: bool
    created: int  # microseconds since the epoch, UTC
    consents: bool = False  # may write Consents through /fhir (privacy/authority.py)


# -- FHIR resources --------------------------------------------------------------------------------------------------


class ResourceTx(Protocol):
    """The FHIR resources in one database transaction. Everything done through it commits together or not at all."""

    # Called once the transaction's body has succeeded, in the transaction, just before it commits.
    before_commit: list[Callable[[], None]]

    def lock(self, key: str) -> None:
        """Serialise with every other transaction that locks the same key, until this one ends."""

    def current(self, res_type: str, res_id: str) -> StoredResource | None:
        """The current version (deleted or not), locked against concurrent writers until the transaction ends."""

    def reserve(self, res_type: str, res_id: str) -> None:
        """Declare a server-assigned id as new, so that save() needs no current() first."""

    def save(self, version: StoredResource, index: IndexRows, facts: VersionFacts) -> None:
        """Store a new version (create or update) with its visibility facts, and replace the resource's search
        index."""

    def delete(self, res_type: str, res_id: str, version_id: int, last_updated: int) -> None:
        """Record a deletion as a new version (with the visibility facts of the version it deletes) and drop the
        resource's search index."""

    def search(self, request: Any) -> SearchResult:
        """Run a parsed search (r4/search.py) inside this transaction."""

    def version_visible(self, res_type: str, res_id: str, version_id: int, restriction: Any) -> bool:
        """ResourceStore.version_visible, seeing this transaction's own writes."""

    def type_versions(self, res_type: str) -> tuple[int, int]:
        """ResourceStore.type_versions, seeing this transaction's own writes: a cheap check that a cache of the
        type's resources still holds."""


class ResourceStore(Protocol):
    """Stored FHIR resource versions: reads by id and version, history, search, and write transactions."""

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
        after: HistoryCursor | None = None,
    ) -> tuple[list[StoredResource], int | None]: ...

    def histories(self, res_type: str, res_ids: Iterable[str]) -> dict[str, list[StoredResource]]:
        """Every version of each resource of ``res_type`` named, by id, newest first as ``history`` orders them
        (an id with no version is left out): the histories of many resources in a few statements."""

    def type_versions(self, res_type: str) -> tuple[int, int]:
        """The number of resources of a type (live and deleted) and the sum of their current version ids: it
        changes with every create, update and delete of the type, by any process."""

    def search(self, request: Any) -> SearchResult: ...

    def write(self) -> AbstractContextManager[ResourceTx]: ...

    def version_visible(self, res_type: str, res_id: str, version_id: int, restriction: Any) -> bool:
        """Whether that version (a deletion too) may be seen under ``restriction`` (r4/search.py Restriction),
        decided on the facts kept with it; False if there is no such version."""


# -- IOP records -----------------------------------------------------------------------------------------------------


class RecordTx(Protocol):
    def record(self, kind: str, id: str, *, lock: bool = True) -> StoredRecord | None:
        """The stored record; with ``lock``, serialised with every other writer of it until the transaction ends."""

    def save_record(self, record: StoredRecord) -> None:
        """Insert the record, or replace the stored one with the same kind and id."""


class RecordStore(Protocol):
    """The IOP records (/iop) and the FHIR resources each produced."""

    def record(self, kind: str, id: str) -> StoredRecord | None: ...

    def records(
        self, kind: str, *, enrollment_id: str | None = None, offset: int = 0, count: int = 20
    ) -> tuple[list[StoredRecord], int]:
        """A page of records of one kind (of one enrollment if given), oldest first, and the total."""

    def enrollments_during(self, start: date, end: date) -> list[StoredRecord]:
        """The active enrollments whose stay may overlap ``start``..``end``: admitted by ``end`` and not discharged
        (by their latest active discharge, on a readable day) before ``start``. At least those: which stays a
        period counts is decided on the stays (outcomes/program.py cohort)."""

    def records_of(self, kinds: Iterable[str], enrollment_ids: Iterable[str]) -> list[StoredRecord]:
        """The records of ``kinds`` (of every status) that belong to the enrollments given, oldest first."""

    def group_sessions_of(self, enrollment_ids: Iterable[str]) -> list[StoredRecord]:
        """The group session records (of every status) naming any of the enrollments as an attendee, each once,
        oldest first."""

    def stay_keys(self, kinds: Iterable[str], enrollment_ids: Iterable[str]) -> dict[str, tuple[int, ...]]:
        """For each enrollment given, a key of its records of ``kinds`` and of the group sessions naming it (every
        status), read without their content: it changes whenever one of them is written (a write raises a record's
        version and stamps its update), is added, or leaves the set (an attendee removed from a group). The outcomes
        keep the stays they built under it (outcomes/load.py)."""

    def current_versions(self, references: Iterable[str]) -> dict[str, int]:
        """The current version id of each resource named (``Type/id``), deleted ones included; those never written
        are absent."""


# -- inbound referrals -----------------------------------------------------------------------------------------------


class ReferralTx(Protocol):
    def referral(self, id: str, *, lock: bool = True) -> StoredRecord | None:
        """The referral (a StoredRecord of kind REFERRAL); with ``lock``, serialised with every other writer of it
        until the transaction ends."""

    def save_referral(self, referral: StoredRecord) -> None:
        """Insert the referral, or replace the stored one with the same id."""


class Referrals(Protocol):
    """Inbound referrals (exchange/referrals.py), each read as a StoredRecord of kind REFERRAL whose content holds the
    referral's own status (requested, accepted, declined, no-show, admitted)."""

    def referral(self, id: str) -> StoredRecord | None: ...

    def referrals(
        self, *, status: str | None = None, offset: int = 0, count: int = 20
    ) -> tuple[list[StoredRecord], int]:
        """A page of referrals (in ``status`` if given), oldest first, and the total."""


# -- the outbox ------------------------------------------------------------------------------------------------------


class OutboxTx(Protocol):
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


class Outbox(Protocol):
    """The outbox rows as workers lease and settle them, and as operators list and retry them."""

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


# -- sync cursors ----------------------------------------------------------------------------------------------------


class SyncCursorTx(Protocol):
    def save_sync_cursor(self, partner_id: str, patient_id: str, res_type: str, last_updated: str, now: int) -> None:
        """Set how far sync has stored a partner's resources of one type for one patient (the partner's
        meta.lastUpdated, as written), in the transaction that stored them."""


class SyncCursors(Protocol):
    def sync_cursor(self, partner_id: str, patient_id: str, res_type: str) -> str | None:
        """The partner's meta.lastUpdated up to which sync has stored its resources of this type and patient."""


# -- Subscription event counters -------------------------------------------------------------------------------------


class SubscriptionEventTx(Protocol):
    def next_subscription_event(self, sub_id: str, now: int) -> int:
        """The number of the Subscription's next event, counting from 1, taken in this transaction: concurrent
        transactions that number events of the same Subscription wait for each other, so no number is given twice,
        and one that rolls back takes none. The count outlives the Subscription (a delete and re-create under the
        same id counts on)."""


class SubscriptionEvents(Protocol):
    def subscription_events(self, sub_id: str) -> int | None:
        """How many events of the Subscription were numbered, or None if none ever was."""


# -- the clients of the token endpoint -------------------------------------------------------------------------------


class ClientTables(Protocol):
    """The clients registered at the token endpoint, and the jtis of the client assertions it accepted (each kept
    until it expires, so that no process accepts one twice)."""

    def add_client(self, client: StoredClient) -> bool:
        """Store a new client; False (nothing stored) if its client id is taken."""

    def client(self, client_id: str) -> StoredClient | None: ...

    def clients(self) -> list[StoredClient]:
        """Every client, by client id."""

    def disable_client(self, client_id: str) -> bool:
        """Mark the client inactive; False if there is no such client."""

    def jti_used(self, client_id: str, jti: str) -> bool:
        """Whether the client's assertion with this jti was accepted (and has not expired since)."""

    def use_jti(self, client_id: str, jti: str, expires_at: int) -> bool:
        """Keep the jti of an accepted assertion until ``expires_at``; False (and nothing changed) if it was already
        used: of processes accepting the same assertion at once, only one succeeds."""

    def purge_jtis(self, now: int) -> int:
        """Delete the jtis expired before ``now``; returns how many."""


# -- the audit log ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditRow:
    """One event of the audit log (privacy/audit.py renders it as an AuditEvent): who (the client, the partner it acts
    for, its purpose of use), what (an audit.ACTIONS name and its outcome, 0/4/8/12), about which patient and
    resources, and the search as received. Rows are appended, never changed."""

    id: str
    recorded: int  # microseconds since the epoch, UTC
    action: str
    outcome: str
    client_id: str
    on_behalf_of: str | None = None  # "Organization/<partner id>"
    purpose: str | None = None  # v3-ActReason code
    patient: str | None = None  # "Patient/<id>": the one patient the event is about, if there is one
    entities: tuple[str, ...] = ()  # "Type/id" of the resources read, written or disclosed
    query: str | None = None  # a search as received (path and query string)


# Inclusive bounds of ``recorded`` in microseconds; None leaves that end open.
RecordedRange = tuple[int | None, int | None]
# The columns an AuditQuery condition may test: equality, but "entity" is one of the row's entities or its patient.
AUDIT_FIELDS = frozenset({"id", "client_id", "on_behalf_of", "patient", "action", "outcome", "entity"})


@dataclass(frozen=True)
class AuditQuery:
    """A search of the audit log. Every condition must hold; a condition holds if one of its alternatives does."""

    where: tuple[tuple[tuple[str, str], ...], ...] = ()  # conditions of (AUDIT_FIELDS name, value) alternatives
    recorded: tuple[tuple[RecordedRange, ...], ...] = ()  # conditions of ranges
    partners_only: bool = False  # only rows of a client acting for a partner (on_behalf_of set)
    oldest_first: bool = False  # else newest first
    offset: int = 0
    count: int = 20
    total: bool = False
    after: tuple[int, str] | None = None  # (recorded, id) of the last row of the previous page: the page follows it


class AuditLogTx(Protocol):
    def append_audit(self, rows: Sequence[AuditRow]) -> None:
        """Add rows to the audit log: they commit or roll back with this transaction."""


class AuditLog(Protocol):
    """The append-only audit log: rows added in a write's transaction (AuditLogTx) or in batches of their own, read
    by id, searched, and paged through by id for a Bulk Data export."""

    def append_audit(self, rows: Sequence[AuditRow]) -> None:
        """Add rows in one transaction of their own."""

    def audit_row(self, id: str) -> AuditRow | None: ...

    def audit_rows(self, query: AuditQuery) -> tuple[list[AuditRow], int | None]:
        """A page of the rows the query matches, by recorded (then id), and their total if ``query.total``."""

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
        """At most ``limit`` rows by id after ``after``, recorded after ``since`` and not after ``until``; about one
        of ``patients`` ("Patient/<id>") if given, or about some patient if ``any_patient``."""


# -- all of them -----------------------------------------------------------------------------------------------------


class WriteTx(ResourceTx, RecordTx, ReferralTx, OutboxTx, SyncCursorTx, SubscriptionEventTx, AuditLogTx, Protocol):
    """One database transaction over every concern: a FHIR write, the records, referrals, deliveries, cursors, event
    numbers and audit rows it causes commit together or not at all."""


class Store(ResourceStore, RecordStore, Referrals, Outbox, SyncCursors, SubscriptionEvents, AuditLog, Protocol):
    """Every concern of the store but export jobs and the token endpoint's clients: what the Repository is built on."""

    def write(self) -> AbstractContextManager[WriteTx]: ...

    def close(self) -> None: ...
