"""The FHIR interactions over a Store: validation, versioning, meta, indexing and conditional logic, written once.

https://hl7.org/fhir/R4/http.html. Every write here runs inside a WriteTx so that a transaction Bundle can compose
several of them atomically; the public methods open one transaction each.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol
from urllib.parse import parse_qsl

import jsonpatch
import orjson

from iop_fhir.errors import (
    BadRequest,
    Conflict,
    Gone,
    Invalid,
    Issue,
    NotFound,
    PreconditionFailed,
    Unprocessable,
)
from iop_fhir.privacy import visibility
from iop_fhir.r4 import compartment, definitions, indexing, search, validation
from iop_fhir.r4.ids import time_ordered_id
from iop_fhir.r4.indexing import IndexRows
from iop_fhir.r4.instants import http_date, instant, now_us
from iop_fhir.r4.profiles import ProfileRegistry
from iop_fhir.store.base import HistoryCursor, SearchResult, Store, StoredResource, VersionFacts, WriteTx

MAX_DEPTH = 254  # orjson's nesting limit when it serialises a resource
MAX_VERSION = 2**31 - 1  # resources.version_id is a 32-bit integer
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}\Z")  # https://hl7.org/fhir/R4/datatypes.html#id


def version_number(text: str) -> int | None:
    """A version id as this server issues them (1 to 2**31-1, ASCII digits), or None. ``str.isdigit`` alone
    also takes "²" and other scripts' digits, which ``int`` then refuses (as it refuses 4301 digits)."""
    if not (text.isascii() and text.isdigit()) or len(text.lstrip("0")) > 10:
        return None
    number = int(text)
    return number if 0 < number <= MAX_VERSION else None


def version_from_etag(value: object) -> int | None:
    """``W/"3"`` or ``"3"`` -> 3 (https://hl7.org/fhir/R4/http.html#concurrency); None if it is no version ETag."""
    tag = value.strip() if isinstance(value, str) else ""
    tag = tag[2:] if tag.startswith("W/") else tag
    return version_number(tag.strip('"'))


def check_id(res_type: str, res_id: str) -> None:
    """The id a PUT, PATCH or DELETE names in its URL must be a FHIR id (https://hl7.org/fhir/R4/datatypes.html#id):
    a longer or stranger one can name no stored resource, and would not fit the store's id column."""
    if not _ID.match(res_id):
        shown = res_id if len(res_id) <= 80 else res_id[:77] + "..."
        raise BadRequest(
            f"{shown!r} in the URL is not a valid resource id: 1 to 64 characters from A-Z a-z 0-9 - .",
            f"{res_type}.id",
            code="value",
        )


def check_type(res_type: str) -> None:
    if res_type not in definitions.resource_types():
        raise NotFound(f"Unknown resource type '{res_type}'", code="not-supported")


@dataclass(frozen=True)
class WriteResult:
    """The outcome of one write: the stored version and the status it earns (201 created, 200 otherwise)."""

    stored: StoredResource
    created: bool = False
    unchanged: bool = False  # a conditional create that found its match


def _validate(res_type: str, body: Any, *, res_id: str | None = None, require_id: bool = False) -> None:
    issues = validation.validate(body, expected_type=res_type, expected_id=res_id, require_id=require_id)
    errors = [i for i in issues if i.severity in ("error", "fatal")]
    if errors:
        raise Invalid(errors)


def _index(resource: dict[str, Any]) -> IndexRows:
    return indexing.extract(resource)


def _stamp(body: dict[str, Any], res_id: str, version_id: int, last_updated: int) -> dict[str, Any]:
    """The resource as stored: id and meta.versionId/lastUpdated set by the server, resourceType, id, meta first."""
    meta = dict(body.get("meta") or {})
    meta["versionId"] = str(version_id)
    meta["lastUpdated"] = instant(last_updated)
    stamped = {"resourceType": body["resourceType"], "id": res_id, "meta": meta}
    stamped.update((k, v) for k, v in body.items() if k not in stamped)
    return stamped


def parse_conditional(res_type: str, query: str, *, header: str) -> list[tuple[str, str]]:
    """The search parameters of a conditional request (``If-None-Exist: identifier=x`` or ``Type?identifier=x``)."""
    if "?" in query:
        prefix, query = query.split("?", 1)
        if prefix and prefix.rstrip("/").split("/")[-1] != res_type:
            raise BadRequest(f"{header} names type '{prefix}', expected '{res_type}'", header)
    params = parse_qsl(query, keep_blank_values=True)
    if not params:
        raise BadRequest(f"{header} has no search parameters", header)
    return params


WriteHook = Callable[[WriteTx, dict[str, Any], StoredResource], None]


class Access(Protocol):
    """What one client may do (security/access.py): the SMART scope check of each interaction, the types a system
    level history may return, and the Part 2 restriction of what it may see (None: everything)."""

    @property
    def restriction(self) -> search.Visibility | None: ...

    def require(self, res_type: str, interaction: str) -> None:
        """Raise Forbidden unless the client may do ``interaction`` (scopes.INTERACTIONS) on ``res_type``."""

    def searchable_types(self) -> frozenset[str] | None:
        """The types a system-level search or history may return; None: every type."""

    def authorize_type(self, res_type: str) -> None:
        """Raise Forbidden if the client may write no resource of ``res_type`` (privacy/authority.py)."""

    def authorize_change(self, res_type: str, previous: dict[str, Any] | None, resource: dict[str, Any]) -> None:
        """Raise Forbidden if the client may not store ``resource`` over ``previous``."""


class Repository:
    def __init__(
        self,
        store: Store,
        *,
        default_count: int = 20,
        max_count: int = 1000,
        profiles: ProfileRegistry | None = None,
    ) -> None:
        self.store = store
        self.default_count = default_count
        self.max_count = max_count
        self.profiles = profiles
        # Called in the write's transaction after every stored version, in the order added (runtime.py registers
        # them by name): what they write or enqueue commits or rolls back with the write itself.
        self.write_hooks: dict[str, WriteHook] = {}
        self.access: Access | None = None  # set on the per-request copy made by acting_for
        self._written: set[tuple[str, str]] = set()  # what the per-request copy stored, for its later references

    def add_write_hook(self, name: str, hook: WriteHook) -> None:
        """Run ``hook`` after every version this repository stores, after the hooks added before it."""
        if name in self.write_hooks:
            raise ValueError(f"a write hook named {name!r} is already registered")
        self.write_hooks[name] = hook

    def acting_for(self, access: Access) -> Repository:
        """This repository as one client sees it: every public interaction is checked against ``access`` first,
        reads, searches, history and the matches of conditional writes see only what its restriction allows, and
        a write may not touch a resource the client cannot see (it is answered as if there were none)."""
        view = copy.copy(self)
        view.access = access
        view._written = set()
        return view

    def check(self, res_type: str, interaction: str) -> None:
        if self.access is not None:
            self.access.require(res_type, interaction)

    def expect_created(self, res_type: str, res_id: str) -> None:
        """Count ``res_type/res_id`` as created by this request before it is written (a transaction's other entries
        may refer to it whatever their order); if it is not created, the transaction fails and nothing stands."""
        if self.access is not None:
            self._written.add((res_type, res_id))

    def _authorize(self, res_type: str) -> None:
        """Who may write a type at all, before anything is looked up (privacy/authority.py)."""
        if self.access is not None:
            self.access.authorize_type(res_type)

    @property
    def restriction(self) -> search.Visibility | None:
        return self.access.restriction if self.access is not None else None

    def sees(self, reader: Store | WriteTx, stored: StoredResource) -> bool:
        """Whether the client may see this version (always, without a restriction): decided on the patients and
        labels it had (a deletion: those of the version it deleted), never on another version."""
        restriction = self.restriction
        if restriction is None:
            return True
        return reader.version_visible(stored.res_type, stored.res_id, stored.version_id, restriction)

    def hides(self, reader: Store | WriteTx, stored: StoredResource | None) -> bool:
        """Whether a live current version exists that the client may not see."""
        return stored is not None and not stored.deleted and not self.sees(reader, stored)

    def knows(self, res_type: str, res_id: str) -> bool:
        """Whether the resource exists for the client: it has a version the client may see. A resource none of
        whose versions it may see is, to it, one that never existed."""
        if self.restriction is None:
            return self.store.read(res_type, res_id) is not None
        total = self.store.history(
            res_type, res_id, since=None, at=None, count=0, offset=0, restriction=self.restriction
        )[1]
        return total is None or total > 0  # None: more versions than are counted

    def search_request(
        self, res_type: str, params: list[tuple[str, str]], *, lenient: bool = False, base_url: str | None = None
    ) -> search.SearchRequest:
        """The parsed search, with the client's restriction and a scope check of every type it includes."""
        request = search.parse(
            res_type,
            params,
            lenient=lenient,
            default_count=self.default_count,
            max_count=self.max_count,
            base_url=base_url,
        )
        if self.access is None:
            return request
        for include in request.includes:
            reached = include.source_type if include.reverse else include.target_type
            if reached is not None:
                self.access.require(reached, "search")
        restriction = self.access.restriction
        return replace(request, restriction=restriction) if restriction is not None else request

    def check_included(self, result: SearchResult) -> None:
        """An _include without a target type may reach any type: each type it reached must be searchable too."""
        if self.access is not None:
            for res_type in sorted({res.res_type for res in result.included}):
                self.access.require(res_type, "search")

    # -- profiles ----------------------------------------------------------------------------------------------

    def profile_issues(self, resource: Any) -> list[Issue]:
        """The errors of ``resource`` against the known profiles its ``meta.profile`` claims (every write is
        checked against them, https://hl7.org/fhir/R4/profiling.html#profile-uses)."""
        if self.profiles is None:
            return []
        return [i for i in self.profiles.claimed_issues(resource) if i.severity in ("error", "fatal")]

    def validation_issues(
        self, res_type: str, body: Any, res_id: str | None = None, *, profile: str | None = None
    ) -> list[Issue]:
        """Every issue of a resource for $validate: R4, the profiles it claims and ``profile`` if given
        (https://hl7.org/fhir/R4/resource-operation-validate.html)."""
        self.check(res_type, "$validate")
        if profile is not None and (self.profiles is None or not self.profiles.known(profile)):
            raise BadRequest(f"profile '{profile[:200]}' is not known to this server", "profile", code="not-supported")
        issues = validation_issues(res_type, body, res_id)
        if self.profiles is None or not isinstance(body, dict) or body.get("resourceType") != res_type:
            return issues
        found = self.profiles.claimed_issues(body)
        if profile is not None:
            found += [i for i in self.profiles.check(body, profile) if i not in found]
        return issues + found

    # -- reads -------------------------------------------------------------------------------------------------

    def read(self, res_type: str, res_id: str, *, tx: WriteTx | None = None) -> StoredResource:
        """The current version; inside ``tx`` (a transaction Bundle's GET entry) as that transaction sees it."""
        check_type(res_type)
        self.check(res_type, "read")
        reader: Store | WriteTx = self.store if tx is None else tx
        stored = self.store.read(res_type, res_id) if tx is None else tx.current(res_type, res_id)
        if stored is None or not self.sees(reader, stored):
            raise NotFound(f"{res_type}/{res_id} is not known")
        if stored.deleted:
            raise Gone(
                f"{res_type}/{res_id} was deleted",
                headers={
                    "ETag": f'W/"{stored.version_id}"',
                    "Last-Modified": http_date(stored.last_updated),
                },
            )
        return stored

    def vread(self, res_type: str, res_id: str, version: str, *, tx: WriteTx | None = None) -> StoredResource:
        """One version; inside ``tx`` also the version that transaction wrote."""
        check_type(res_type)
        self.check(res_type, "vread")
        number = version_number(version)  # None: no such version can exist
        current = tx.current(res_type, res_id) if tx is not None and number is not None else None
        if tx is not None and current is not None and current.version_id == number and not current.deleted:
            if self.sees(tx, current):
                return current
        stored = self.store.vread(res_type, res_id, number) if number is not None else None
        if stored is None or not self.sees(self.store, stored):
            # A version the client may not see is answered as one that never existed.
            if not self.knows(res_type, res_id):
                raise NotFound(f"{res_type}/{res_id} is not known")
            if number is None:
                raise NotFound(f"{res_type}/{res_id}/_history/{version[:80]} is not known")
            raise NotFound(f"{res_type}/{res_id} has no version {version}")
        if stored.deleted:
            raise Gone(f"version {version} of {res_type}/{res_id} is a deletion")
        return stored

    def compartment_search(
        self,
        patient_id: str,
        res_type: str,
        params: list[tuple[str, str]],
        *,
        lenient: bool = False,
        base_url: str | None = None,
    ) -> tuple[search.SearchRequest, SearchResult]:
        """The search of ``res_type`` in the compartment of ``Patient/patient_id``
        (https://hl7.org/fhir/R4/compartmentdefinition-patient.html): the type's search, restricted to the
        resources that one of the compartment's parameters puts there. A Patient the client may not see is
        answered as one that never existed."""
        check_type(res_type)
        self.check(res_type, "search-type")
        if res_type not in compartment.patient_compartment():
            raise BadRequest(f"{res_type} is not in the Patient compartment", res_type, code="not-supported")
        if not _ID.match(patient_id) or not self.knows("Patient", patient_id):
            raise NotFound(f"Patient/{patient_id[:80]} is not known")
        request = self.search_request(res_type, params, lenient=lenient, base_url=base_url)
        result = self.store.search(replace(request, compartment=compartment_filters(res_type, patient_id)))
        self.check_included(result)
        return request, result

    def search(
        self, res_type: str, params: list[tuple[str, str]], *, lenient: bool = False, base_url: str | None = None
    ) -> tuple[search.SearchRequest, SearchResult]:
        """Type search; ``base_url`` lets absolute references to this server match as ``Type/id``."""
        check_type(res_type)
        self.check(res_type, "search-type")
        request = self.search_request(res_type, params, lenient=lenient, base_url=base_url)
        result = self.store.search(request)
        self.check_included(result)
        return request, result

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
        if res_type is not None:
            check_type(res_type)
            self.check(res_type, "history-instance" if res_id is not None else "history-type")
        types = self.access.searchable_types() if self.access is not None and res_type is None else None
        if res_id is not None and res_type is not None and not self.knows(res_type, res_id):
            raise NotFound(f"{res_type}/{res_id} is not known")
        return self.store.history(
            res_type,
            res_id,
            since=since,
            at=at,
            count=count,
            offset=offset,
            types=types,
            restriction=self.restriction,
            after=after,
        )

    # -- writes, each in its own transaction -----------------------------------------------------------------

    def create(self, res_type: str, body: Any, *, if_none_exist: str | None = None) -> WriteResult:
        check_type(res_type)
        self.check(res_type, "create" if if_none_exist is None else "conditional-create")
        _validate(res_type, body)
        with self.store.write() as tx:
            return self.create_in(tx, res_type, body, if_none_exist=if_none_exist)

    def update(self, res_type: str, res_id: str, body: Any, *, if_match: int | None = None) -> WriteResult:
        check_type(res_type)
        self.check(res_type, "update")
        check_id(res_type, res_id)
        _validate(res_type, body, res_id=res_id, require_id=True)
        with self.store.write() as tx:
            return self.update_in(tx, res_type, res_id, body, if_match=if_match)

    def conditional_update(self, res_type: str, query: str, body: Any, *, if_match: int | None = None) -> WriteResult:
        check_type(res_type)
        self.check(res_type, "conditional-update")
        _validate(res_type, body)
        with self.store.write() as tx:
            return self.conditional_update_in(tx, res_type, query, body, if_match=if_match)

    def patch(
        self, res_type: str, res_id: str, patch: Any, *, if_match: int | None = None, merge: bool = False
    ) -> WriteResult:
        check_type(res_type)
        self.check(res_type, "patch")
        check_id(res_type, res_id)
        with self.store.write() as tx:
            return self.patch_in(tx, res_type, res_id, patch, if_match=if_match, merge=merge)

    def conditional_patch(
        self, res_type: str, query: str, patch: Any, *, if_match: int | None = None, merge: bool = False
    ) -> WriteResult:
        """https://hl7.org/fhir/R4/http.html#patch: the one match of the condition is patched; none is 404 and
        more than one 412. The matches are those the client may see: a hidden match is no match."""
        check_type(res_type)
        self.check(res_type, "conditional-patch")
        with self.store.write() as tx:
            self._authorize(res_type)
            matches = self.matches_in(tx, res_type, query, "url")
            if len(matches) > 1:
                raise PreconditionFailed(
                    f"conditional patch '{query[:100]}' matches more than one {res_type}", "url", code="duplicate"
                )
            if not matches:
                raise NotFound(f"no {res_type} matches '{query[:100]}'")
            return self.patch_in(tx, res_type, matches[0].res_id, patch, if_match=if_match, merge=merge)

    def delete(self, res_type: str, res_id: str) -> StoredResource | None:
        check_type(res_type)
        self.check(res_type, "delete")
        check_id(res_type, res_id)
        with self.store.write() as tx:
            return self.delete_in(tx, res_type, res_id)

    def conditional_delete(self, res_type: str, query: str) -> StoredResource | None:
        check_type(res_type)
        self.check(res_type, "conditional-delete")
        with self.store.write() as tx:
            return self.conditional_delete_in(tx, res_type, query)

    # -- writes inside a given transaction (used by the above and by transaction Bundles) ----------------------

    def matches_in(self, tx: WriteTx, res_type: str, query: str, header: str) -> list[StoredResource]:
        """The (at most two) current resources a conditional create, update, delete or reference matches.

        The condition must filter (https://hl7.org/fhir/R4/http.html#cond-update): one whose parameters are all
        empty or ignored (``identifier=``, ``_format=json``) would match every resource of the type, and one with
        result parameters (``_summary=count``, ``_offset=5``) would hide the matches it has.
        """
        params = parse_conditional(res_type, query, header=header)
        for key, _ in params:
            if key.split(":", 1)[0] in search.RESULT_PARAMETERS:
                raise BadRequest(f"{header}: result parameter '{key}' has no place in a condition", header)
        request = search.parse(res_type, [*params, ("_count", "2"), ("_total", "none")], default_count=2, max_count=2)
        if self.restriction is not None:
            request = replace(request, restriction=self.restriction)
        if not request.filters:
            raise BadRequest(
                f"{header} '{query[:100]}' has no search criteria: a condition needs a search parameter with a value",
                header,
            )
        # Conditional interactions on one type are serialised so that check-then-write cannot race.
        tx.lock(f"conditional:{res_type}")
        return tx.search(request).matches

    def create_in(
        self,
        tx: WriteTx,
        res_type: str,
        body: dict[str, Any],
        *,
        if_none_exist: str | None = None,
        res_id: str | None = None,
        fresh: bool = False,
    ) -> WriteResult:
        self._authorize(res_type)
        if if_none_exist is not None:
            matches = self.matches_in(tx, res_type, if_none_exist, "If-None-Exist")
            if len(matches) > 1:
                raise PreconditionFailed(
                    f"If-None-Exist '{if_none_exist}' matches more than one {res_type}",
                    "If-None-Exist",
                    code="duplicate",
                )
            if matches:
                return WriteResult(matches[0], unchanged=True)
        if res_id is None or fresh:
            res_id = res_id or time_ordered_id()
            tx.reserve(res_type, res_id)
        elif tx.current(res_type, res_id) is not None:
            raise Conflict(f"{res_type}/{res_id} already exists")
        return WriteResult(self._save(tx, res_type, res_id, body, 1, "POST"), created=True)

    def update_in(
        self,
        tx: WriteTx,
        res_type: str,
        res_id: str,
        body: dict[str, Any],
        *,
        if_match: int | None = None,
        method: str = "PUT",
    ) -> WriteResult:
        self._authorize(res_type)
        current = tx.current(res_type, res_id)
        if self.restriction is not None and (current is None or current.deleted or self.hides(tx, current)):
            # A restricted client creates only with POST: a PUT to an id it cannot see is answered as if none
            # existed, whether or not one does, so that the answer tells nothing.
            raise NotFound(f"{res_type}/{res_id} is not known")
        if if_match is not None:
            if current is None or current.deleted:
                raise PreconditionFailed(
                    f'If-Match W/"{if_match}" given but {res_type}/{res_id} does not exist', "If-Match"
                )
            if current.version_id != if_match:
                raise PreconditionFailed(
                    f'If-Match W/"{if_match}" does not match the current version {current.version_id} of '
                    f"{res_type}/{res_id}",
                    "If-Match",
                )
        version = current.version_id + 1 if current else 1
        previous = current if current is not None and not current.deleted else None
        stored = self._save(tx, res_type, res_id, body, version, method, previous)
        return WriteResult(stored, created=current is None or current.deleted)

    def conditional_update_in(
        self, tx: WriteTx, res_type: str, query: str, body: dict[str, Any], *, if_match: int | None = None
    ) -> WriteResult:
        self._authorize(res_type)
        matches = self.matches_in(tx, res_type, query, "url")
        if len(matches) > 1:
            raise PreconditionFailed(
                f"conditional update '{query}' matches more than one {res_type}", "url", code="duplicate"
            )
        body_id = body.get("id")
        if matches:
            target = matches[0].res_id
            if body_id is not None and body_id != target:
                raise BadRequest(
                    f"id '{body_id}' in the body does not match {res_type}/{target} found by the condition",
                    f"{res_type}.id",
                )
            return self.update_in(tx, res_type, target, body, if_match=if_match)
        if if_match is not None:
            raise PreconditionFailed(
                f'If-Match W/"{if_match}" given but no {res_type} matches the condition', "If-Match"
            )
        return self.create_by_condition_in(tx, res_type, body, res_id=body_id)

    def create_by_condition_in(
        self, tx: WriteTx, res_type: str, body: dict[str, Any], *, res_id: str | None
    ) -> WriteResult:
        """The create of a conditional update that matched nothing, with the id the body names (or ``res_id``).
        As in update_in, a restricted client creates only with POST: a body id is answered as an id that never
        existed, whether or not a resource it cannot see has it."""
        body_id = body.get("id")
        if body_id is not None and self.restriction is not None:
            raise NotFound(f"{res_type}/{body_id} is not known")
        return self.create_in(tx, res_type, body, res_id=res_id)

    def patch_in(
        self,
        tx: WriteTx,
        res_type: str,
        res_id: str,
        patch: Any,
        *,
        if_match: int | None = None,
        merge: bool = False,
    ) -> WriteResult:
        self._authorize(res_type)
        current = tx.current(res_type, res_id)
        if current is None or not self.sees(tx, current):
            raise NotFound(f"{res_type}/{res_id} is not known")
        if current.deleted or current.content is None:
            raise Gone(f"{res_type}/{res_id} was deleted")
        if merge:
            if not isinstance(patch, dict):
                raise BadRequest("a JSON Merge Patch (RFC 7396) of a resource must be a JSON object", "body")
            merged = merge_patch(orjson.loads(current.content), patch)
            _validate(res_type, merged, res_id=res_id, require_id=True)
            return self.update_in(tx, res_type, res_id, merged, if_match=if_match, method="PATCH")
        if not isinstance(patch, list):
            raise BadRequest("a JSON Patch document must be an array of operations", "body")
        try:
            patched = jsonpatch.JsonPatch(patch).apply(orjson.loads(current.content))
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError, KeyError) as exc:
            raise Unprocessable(f"the JSON Patch cannot be applied: {exc}", "body") from exc
        except RecursionError:  # jsonpatch deep-copies the values it adds
            raise Unprocessable("the JSON Patch cannot be applied: a value is nested too deeply", "body") from None
        _validate(res_type, patched, res_id=res_id, require_id=True)
        return self.update_in(tx, res_type, res_id, patched, if_match=if_match, method="PATCH")

    def delete_in(self, tx: WriteTx, res_type: str, res_id: str) -> StoredResource | None:
        self._authorize(res_type)
        current = tx.current(res_type, res_id)
        if current is None or current.deleted or self.hides(tx, current):
            return None
        last_updated = now_us()
        tx.delete(res_type, res_id, current.version_id + 1, last_updated)
        return StoredResource(res_type, res_id, current.version_id + 1, last_updated, True, None, "DELETE")

    def conditional_delete_in(self, tx: WriteTx, res_type: str, query: str) -> StoredResource | None:
        self._authorize(res_type)
        matches = self.matches_in(tx, res_type, query, "url")
        if len(matches) > 1:
            raise PreconditionFailed(
                f"conditional delete '{query}' matches more than one {res_type}", "url", code="duplicate"
            )
        return self.delete_in(tx, res_type, matches[0].res_id) if matches else None

    def _check_patients(self, tx: WriteTx, resource: dict[str, Any], facts: VersionFacts) -> None:
        """A restricted client's write may refer only to Patients it may see or that its request stored: a
        reference to any other Patient is answered as one to a Patient that does not exist (a write never adds to
        the record of a patient whose records the client may not see)."""
        for patient_id in facts.patients:
            if patient_id is None or ("Patient", patient_id) in self._written:
                continue
            if resource.get("resourceType") == "Patient" and resource.get("id") == patient_id:
                continue
            current = tx.current("Patient", patient_id)
            if current is None or current.deleted or not self.sees(tx, current):
                raise Unprocessable(
                    f"Patient/{patient_id} is not known",
                    _reference_path(resource, f"Patient/{patient_id}"),
                    code="processing",
                )

    def _save(
        self,
        tx: WriteTx,
        res_type: str,
        res_id: str,
        body: dict[str, Any],
        version_id: int,
        method: str,
        previous: StoredResource | None = None,
    ) -> StoredResource:
        if self.access is not None:
            before = orjson.loads(previous.content) if previous is not None and previous.content else None
            self.access.authorize_change(res_type, before, body)
        errors = self.profile_issues(body)
        if errors:
            raise Invalid(errors)
        last_updated = now_us()
        resource = _stamp(body, res_id, version_id, last_updated)
        try:
            content = orjson.dumps(resource)
        except orjson.JSONEncodeError:  # nested deeper than orjson's 254 levels (valid, e.g. Extension.extension...)
            raise Invalid(
                f"the resource is nested too deeply to be stored (at most {MAX_DEPTH} levels of objects and arrays)",
                res_type,
                code="too-costly",
            ) from None
        stored = StoredResource(res_type, res_id, version_id, last_updated, False, content, method)
        index = _index(resource)
        facts = visibility.facts_of(resource, index)
        if self.restriction is not None:
            self._check_patients(tx, resource, facts)
        tx.save(stored, index, facts)
        if self.access is not None:
            self._written.add((res_type, res_id))
        for hook in self.write_hooks.values():
            hook(tx, resource, stored)
        return stored


def compartment_filters(res_type: str, patient_id: str) -> tuple[search.Filter, ...]:
    """The filters, to be OR-ed, that put a ``res_type`` in the compartment of ``Patient/patient_id``: each
    parameter the CompartmentDefinition lists for the type (those this server indexes) = the Patient; a Patient
    is in its own compartment too (``_id``)."""
    wanted = [(name, f"Patient/{patient_id}") for name in compartment.patient_compartment()[res_type]]
    if res_type == "Patient":
        wanted.append(("_id", patient_id))
    filters = search.parse(res_type, wanted, lenient=True).filters  # a parameter not indexed here cannot match
    if not filters:
        raise BadRequest(
            f"{res_type} cannot be searched by its Patient compartment here", res_type, code="not-supported"
        )
    return filters


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON Merge Patch: an object's members are merged recursively, null removes a member, and any other
    value (an array too) replaces what was there."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def _reference_path(resource: dict[str, Any], reference: str) -> str:
    """The FHIRPath of the first Reference in ``resource`` whose ``reference`` is ``reference`` (the type when
    there is none)."""

    def walk(node: Any, path: str) -> str | None:
        if isinstance(node, dict):
            if node.get("reference") == reference:
                return path
            for key, value in node.items():
                found = walk(value, f"{path}.{key}")
                if found is not None:
                    return found
        elif isinstance(node, list):
            for n, item in enumerate(node):
                found = walk(item, f"{path}[{n}]")
                if found is not None:
                    return found
        return None

    res_type = str(resource.get("resourceType"))
    return walk({k: v for k, v in resource.items() if k != "meta"}, res_type) or res_type


def validation_issues(res_type: str, body: Any, res_id: str | None = None) -> list[Issue]:
    """Every validation issue of a resource, for $validate."""
    return validation.validate(body, expected_type=res_type, expected_id=res_id)
