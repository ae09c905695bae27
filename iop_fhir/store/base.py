"""What every store offers: stored FHIR resource versions, IOP records, a write transaction, the index row format."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

# The search index of one resource: index kind ("token", "string", "date", "number", "quantity", "reference",
# "uri") -> rows, each a dict of the columns of that kind's table in store/schema.py except res_type and res_id
# (so every row has "param"). Produced by fhir/indexing.py, written by the store beside the resource.
IndexRows = dict[str, list[dict[str, Any]]]


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


@dataclass
class SearchResult:
    """What a search found: the page of matches, what _include/_revinclude added, and the total if asked."""

    matches: list[StoredResource] = field(default_factory=list)
    included: list[StoredResource] = field(default_factory=list)
    total: int | None = None
    has_more: bool = False


class WriteTx(Protocol):
    """One database transaction. Everything done through it commits together or not at all."""

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
        """Run a parsed search (fhir/search.py) inside this transaction."""

    def record(self, kind: str, id: str, *, lock: bool = True) -> StoredRecord | None:
        """The stored record; with ``lock``, serialised with every other writer of it until the transaction ends."""

    def save_record(self, record: StoredRecord) -> None:
        """Insert the record, or replace the stored one with the same kind and id."""


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
    ) -> tuple[list[StoredResource], int]: ...

    def search(self, request: Any) -> SearchResult: ...

    def record(self, kind: str, id: str) -> StoredRecord | None: ...

    def records(
        self, kind: str, *, enrollment_id: str | None = None, offset: int = 0, count: int = 20
    ) -> tuple[list[StoredRecord], int]:
        """A page of records of one kind (of one enrollment if given), oldest first, and the total."""

    def write(self) -> AbstractContextManager[WriteTx]: ...

    def close(self) -> None: ...
