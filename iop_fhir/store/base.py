"""What every store offers the FHIR layer: stored versions, a write transaction, and the index row format."""

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

    def write(self) -> AbstractContextManager[WriteTx]: ...

    def close(self) -> None: ...
