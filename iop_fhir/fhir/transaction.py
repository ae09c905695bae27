"""Batch and transaction Bundles posted to the base URL: envelope checks, urn:uuid linking, conditional
references, validation before the write lock, then the entries run through the Repository in one transaction
(a batch: in chunks of consecutive entries, one transaction each, every entry still succeeding or failing alone).

https://hl7.org/fhir/R4/http.html#transaction
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qsl

import orjson

from iop_fhir.config import Settings
from iop_fhir.errors import (
    BadRequest,
    FhirError,
    Invalid,
    PayloadTooLarge,
    PreconditionFailed,
)
from iop_fhir.fhir import searchset
from iop_fhir.fhir.repository import Repository, WriteResult, check_type, parse_conditional, version_from_etag
from iop_fhir.r4 import definitions, validation
from iop_fhir.r4.ids import time_ordered_id
from iop_fhir.r4.instants import instant
from iop_fhir.store.base import AuditRow, StoredResource, WriteTx

DEFAULT_MAX_ENTRIES = Settings.max_bundle_entries
BATCH_CHUNK = 250  # batch entries written in one database transaction at most (see _batch)
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
# https://hl7.org/fhir/R4/http.html#trules: deletes, then creates, then updates, then reads.
_PHASE = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}\Z")
_LOCAL = ("urn:uuid:", "urn:oid:")
_NARRATIVE_LINK = re.compile(r'(href|src)="(urn:(?:uuid|oid):[^"]+)"')
_JSON_PATCH = "application/json-patch+json"


@dataclass(eq=False)
class _Entry:
    """One request entry, parsed; filled in as it is linked, resolved and run."""

    index: int
    method: str
    res_type: str
    res_id: str | None = None  # None: a type-level request (create, search, conditional update/delete)
    version: str | None = None  # vread
    query: str | None = None  # the condition of a conditional update/delete, or a search's parameters
    resource: dict[str, Any] | None = None
    full_url: str | None = None
    if_match: int | None = None
    if_none_exist: str | None = None
    if_none_match: str | None = None
    patch: list[Any] | None = None
    new_id: str | None = None  # the id given before processing to a create (or a conditional update's create)
    deferred: frozenset[str] = frozenset()  # references only known inside the transaction
    created_by_condition: bool = False  # a conditional update that found no match
    matched: StoredResource | None = None  # a conditional create that found its match
    response: bytes = b""

    @property
    def path(self) -> str:
        return f"Bundle.entry[{self.index}]"


def process(repo: Repository, bundle: Any, *, base_url: str, max_entries: int = DEFAULT_MAX_ENTRIES) -> bytes:
    """Run a ``batch`` or ``transaction`` Bundle; return its ``batch-response``/``transaction-response``.

    A transaction is all or nothing (https://hl7.org/fhir/R4/http.html#transaction): the first failing entry
    is raised as its FhirError, each issue's expression naming the entry (``Bundle.entry[3].request.url``).
    A batch answers every entry, failures with ``response.status`` and ``response.outcome``.
    """
    kind, raw_entries = _envelope(bundle, max_entries)
    base_url = base_url.rstrip("/")
    if kind == "batch":
        return _response_bundle("batch-response", _batch(repo, raw_entries, base_url))
    entries = [_parse_entry(i, raw, base_url) for i, raw in enumerate(raw_entries)]
    for entry in entries:
        _authorize(repo, entry)
    _link(entries, base_url)
    for entry in entries:
        _validate(entry)
    touched: dict[tuple[str, str], int] = {}
    for entry in entries:
        if entry.res_id is not None and entry.method in ("PUT", "PATCH", "DELETE"):
            _touch(touched, entry, entry.res_type, entry.res_id)
    with repo.store.write() as tx:
        _run(repo, tx, entries, base_url)
    return _response_bundle("transaction-response", [e.response for e in entries])


# -- the envelope and its entries ----------------------------------------------------------------------------


def _envelope(bundle: Any, max_entries: int) -> tuple[str, list[Any]]:
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        found = bundle.get("resourceType") if isinstance(bundle, dict) else None
        raise BadRequest(
            f"POST to the base URL takes a batch or transaction Bundle, not {found or 'this body'}",
            "resourceType",
        )
    kind = bundle.get("type")
    if kind not in ("batch", "transaction"):
        raise BadRequest(f"Bundle.type must be 'batch' or 'transaction', not {kind!r}", "Bundle.type")
    raw_entries = bundle.get("entry", [])
    if not isinstance(raw_entries, list):
        raise BadRequest("Bundle.entry must be an array", "Bundle.entry", code="structure")
    if len(raw_entries) > max_entries:
        # The limit keeps one request within what a worker may spend on it (config.py, max_bundle_entries).
        raise PayloadTooLarge(
            f"the Bundle has {len(raw_entries)} entries; this server accepts at most {max_entries} in one {kind} "
            f"(IOP_FHIR_MAX_BUNDLE_ENTRIES): split it into Bundles of at most {max_entries} entries",
            "Bundle.entry",
        )
    return kind, raw_entries


def _parse_entry(index: int, raw: Any, base_url: str) -> _Entry:
    """The request of one entry (https://hl7.org/fhir/R4/bundle-definitions.html#Bundle.entry.request)."""
    path = f"Bundle.entry[{index}]"
    if not isinstance(raw, dict):
        raise BadRequest("a Bundle entry must be an object", path, code="structure")
    request = raw.get("request")
    if not isinstance(request, dict):
        raise BadRequest("the entry has no request", f"{path}.request", code="required")
    method = request.get("method")
    if method not in METHODS:
        raise BadRequest(
            f"request.method must be one of {', '.join(METHODS)}, not {method!r}",
            f"{path}.request.method",
            code="required" if method is None else "value",
        )
    url = request.get("url")
    if not isinstance(url, str) or not url.strip():
        raise BadRequest("the entry has no request.url", f"{path}.request.url", code="required")
    full_url = raw.get("fullUrl")
    if full_url is not None and (not isinstance(full_url, str) or not full_url):
        raise BadRequest("fullUrl must be a non-empty string", f"{path}.fullUrl")
    segments, query = _split_url(url, base_url, f"{path}.request.url")
    entry = _Entry(index, method, segments[0] if segments else "", full_url=full_url)
    with _blame(entry, f"{path}.request.url"):
        _target(entry, segments, query, url)
    resource = raw.get("resource")
    if method in ("POST", "PUT", "PATCH"):
        if not isinstance(resource, dict):
            raise BadRequest(f"a {method} entry needs a resource", f"{path}.resource", code="required")
        if method == "PATCH":
            entry.patch = _json_patch(resource, path)
        else:
            entry.resource = resource
    entry.if_match = _etag(request.get("ifMatch"), f"{path}.request.ifMatch")
    if_none_exist = request.get("ifNoneExist")
    if if_none_exist is not None:
        if method != "POST" or not isinstance(if_none_exist, str):
            raise BadRequest("ifNoneExist is a string, on POST entries only", f"{path}.request.ifNoneExist")
        with _blame(entry, f"{path}.request.ifNoneExist"):
            parse_conditional(entry.res_type, if_none_exist, header="If-None-Exist")
        entry.if_none_exist = if_none_exist
    if_none_match = request.get("ifNoneMatch")
    if isinstance(if_none_match, str):
        entry.if_none_match = if_none_match.strip()
    return entry


def _split_url(url: str, base_url: str, path: str) -> tuple[list[str], str | None]:
    """``Patient/1?x=y`` (relative to the base, or absolute on this server) -> (["Patient", "1"], "x=y")."""
    rest = url.strip()
    if rest.startswith(base_url + "/") or rest.startswith(base_url + "?"):
        rest = rest[len(base_url) :]
    elif "://" in rest.split("?", 1)[0]:
        raise BadRequest(f"request.url '{url}' is not on this server ({base_url})", path, code="not-supported")
    target, sep, query = rest.lstrip("/").partition("?")
    return (target.split("/") if target else []), (query if sep else None)


def _target(entry: _Entry, segments: list[str], query: str | None, url: str) -> None:
    """What the entry's url names, for its method (https://hl7.org/fhir/R4/http.html#transaction)."""
    method = entry.method
    if not segments or not segments[0]:
        raise BadRequest(f"request.url '{url}' names no resource type", code="not-supported")
    check_type(segments[0])
    if segments[0] == "AuditEvent" and method in ("GET", "HEAD"):
        # AuditEvents are the audit log rendered (fhir/auditevents.py), never stored resources: a Bundle entry
        # would find none, so it is refused rather than answered empty.
        raise BadRequest(
            "AuditEvent is read and searched at /fhir/AuditEvent directly, not in a batch or transaction",
            code="not-supported",
        )
    if len(segments) >= 2:
        if not _ID.match(segments[1]):
            raise BadRequest(f"'{segments[1]}' in request.url '{url}' is not a valid resource id")
        entry.res_id = segments[1]
    if method in ("GET", "HEAD"):
        if len(segments) == 1:
            entry.query = query or ""
            return
        if len(segments) == 2:
            return
        if len(segments) == 4 and segments[2] == "_history":
            entry.version = segments[3]
            return
    elif method == "POST":
        if len(segments) == 1 and query is None:
            return
    elif method in ("PUT", "DELETE"):
        if len(segments) == 2 and query is None:
            return
        if len(segments) == 1 and query:
            entry.query = query
            return
    elif method == "PATCH" and len(segments) == 2 and query is None:
        return
    raise BadRequest(f"{method} {url} is not an interaction supported in a Bundle entry", code="not-supported")


def _etag(value: Any, path: str) -> int | None:
    """``W/"3"`` or ``"3"`` -> 3 (https://hl7.org/fhir/R4/http.html#concurrency)."""
    if value is None:
        return None
    version = version_from_etag(value)
    if version is None:
        raise BadRequest(f'ifMatch {value!r:.100} is not a version ETag such as W/"1"', path)
    return version


def _json_patch(resource: dict[str, Any], path: str) -> list[Any]:
    """The JSON Patch of a PATCH entry, sent as a Binary (https://hl7.org/fhir/R4/http.html#patch)."""
    kind = resource.get("resourceType")
    if kind == "Parameters":
        raise BadRequest(
            "FHIRPath Patch (a Parameters resource) is not supported; send a Binary with contentType "
            f"{_JSON_PATCH} holding a JSON Patch",
            f"{path}.resource",
            code="not-supported",
        )
    if kind != "Binary":
        raise BadRequest(f"a PATCH entry takes a Binary holding a JSON Patch, not {kind!r}", f"{path}.resource")
    content_type = resource.get("contentType")
    if not isinstance(content_type, str) or content_type.split(";")[0].strip() != _JSON_PATCH:
        raise BadRequest(
            f"the Binary of a PATCH entry must have contentType {_JSON_PATCH}, not {content_type!r}",
            f"{path}.resource.contentType",
            code="not-supported",
        )
    try:
        operations = orjson.loads(base64.b64decode(str(resource.get("data") or ""), validate=True))
    except (binascii.Error, ValueError) as exc:  # orjson.JSONDecodeError is a ValueError
        raise BadRequest(f"Binary.data is not base64 of a JSON document: {exc}", f"{path}.resource.data") from exc
    if not isinstance(operations, list):
        raise BadRequest("a JSON Patch document must be an array of operations", f"{path}.resource.data")
    return operations


# -- linking: urn:uuid fullUrls and conditional references ---------------------------------------------------


def _link(entries: list[_Entry], base_url: str) -> None:
    """Give every create its id now and rewrite the references to local fullUrls in every resource.

    https://hl7.org/fhir/R4/http.html#trules: a POST entry's fullUrl (urn:uuid:, urn:oid: or absolute) and
    a ``urn:`` fullUrl of a PUT to ``Type/id`` stand for the resource as stored; references to them are
    rewritten to ``Type/id``. Where the target is only known inside the transaction (a conditional create may
    find an existing resource, a conditional update its match) the reference gets a provisional ``Type/id``
    that ``_run`` fixes.
    """
    refs: dict[str, str] = {}  # fullUrl -> Type/id
    aliases: dict[str, dict[str, str]] = {}  # base of an absolute fullUrl -> {"Type/old-id": "Type/new-id"}
    provisional: set[str] = set()
    owners: dict[str, int] = {}
    for entry in entries:
        if entry.method == "POST" or (entry.method == "PUT" and entry.res_id is None):
            entry.new_id = time_ordered_id()
            target = f"{entry.res_type}/{entry.new_id}"
            if entry.method == "PUT" or entry.if_none_exist is not None:
                provisional.add(target)
        elif entry.method == "PUT" and entry.full_url is not None and entry.full_url.startswith(_LOCAL):
            target = f"{entry.res_type}/{entry.res_id}"
        else:
            continue
        if entry.full_url is None:
            continue
        if entry.full_url in owners:
            raise BadRequest(
                f"fullUrl '{entry.full_url}' is also the fullUrl of Bundle.entry[{owners[entry.full_url]}]",
                f"{entry.path}.fullUrl",
                code="duplicate",
            )
        owners[entry.full_url] = entry.index
        refs[entry.full_url] = target
        base, old = _split_absolute(entry.full_url)
        if entry.method == "POST" and base and old and old.startswith(entry.res_type + "/"):
            aliases.setdefault(base, {})[old] = target
    for entry in entries:
        if entry.resource is None:
            continue
        entry_base = _split_absolute(entry.full_url)[0] if entry.full_url else base_url
        found: set[str] = set()
        unresolved: list[str] = []
        entry.resource = _rewrite_entry(
            entry, refs, aliases.get(entry_base or base_url, {}), provisional, found, unresolved
        )
        if unresolved:
            raise BadRequest(
                f"reference '{unresolved[0]}' is not the fullUrl of a created or updated entry of this transaction",
                _locate(entry.resource, unresolved[0], f"{entry.path}.resource") or f"{entry.path}.resource",
                code="not-found",
            )
        entry.deferred = frozenset(found)


def _split_absolute(full_url: str | None) -> tuple[str | None, str | None]:
    """``http://x/fhir/Patient/1`` -> ("http://x/fhir", "Patient/1"); (None, None) for urns and the like."""
    if full_url is None or "://" not in full_url:
        return None, None
    parts = full_url.rstrip("/").rsplit("/", 2)
    if len(parts) != 3 or parts[1] not in definitions.resource_types():
        return None, None
    return parts[0], f"{parts[1]}/{parts[2]}"


def _rewrite_entry(
    entry: _Entry,
    refs: dict[str, str],
    aliases: dict[str, str],
    watch: set[str],
    found: set[str],
    unresolved: list[str],
) -> Any:
    """``_rewrite`` of the entry's resource, which is not validated yet: JSON nested close to the parser's limit
    of 1024 levels would exhaust the interpreter's stack."""
    try:
        return _rewrite(entry.resource, refs, aliases, watch, found, unresolved)
    except RecursionError:
        raise BadRequest(
            "the resource is nested too deeply to be processed", f"{entry.path}.resource", code="too-costly"
        ) from None


def _rewrite(
    node: Any,
    refs: dict[str, str],
    aliases: dict[str, str],
    watch: set[str],
    found: set[str],
    unresolved: list[str],
) -> Any:
    """``node`` with every ``reference`` (and ``url``, narrative link) equal to a key of ``refs`` replaced.

    Copy on write: untouched subtrees are shared. Conditional references (``Type?query``) and results that are
    in ``watch`` go to ``found``; ``urn:`` references with no entry go to ``unresolved``.
    """
    if isinstance(node, list):
        copied: list[Any] | None = None
        for i, item in enumerate(node):
            if isinstance(item, dict | list):
                new_item = _rewrite(item, refs, aliases, watch, found, unresolved)
                if new_item is not item:
                    if copied is None:
                        copied = list(node)
                    copied[i] = new_item
        return node if copied is None else copied
    if not isinstance(node, dict):
        return node
    changed: dict[str, Any] | None = None
    for key, value in node.items():
        new: Any
        if isinstance(value, str):
            if key == "reference":
                new = refs.get(value) or aliases.get(value)
                if new is None:
                    if value.startswith(_LOCAL):
                        unresolved.append(value)
                    elif "?" in value and value.split("?", 1)[0] in definitions.resource_types():
                        found.add(value)
                    elif value in watch:
                        found.add(value)
                    continue
                if new in watch:
                    found.add(new)
            elif key == "url":
                new = refs.get(value)
                if new is None:
                    continue
            elif key == "div" and "urn:" in value:
                new = _NARRATIVE_LINK.sub(lambda m: f'{m[1]}="{refs.get(m[2], m[2])}"', value)
                if new == value:
                    continue
            else:
                continue
        elif isinstance(value, dict | list):
            new = _rewrite(value, refs, aliases, watch, found, unresolved)
            if new is value:
                continue
        else:
            continue
        if changed is None:
            changed = dict(node)
        changed[key] = new
    return node if changed is None else changed


def _locate(node: Any, reference: str, path: str) -> str | None:
    """The FHIRPath of the first ``reference`` equal to ``reference`` in ``node``, for error messages."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and value == reference:
                return f"{path}.reference"
            if isinstance(value, dict | list):
                found = _locate(value, reference, f"{path}.{key}")
                if found:
                    return found
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found = _locate(item, reference, f"{path}[{i}]")
            if found:
                return found
    return None


def _condition_key(res_type: str, query: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return res_type, tuple(sorted(parse_conditional(res_type, query, header="reference")))


# -- validation, before the write lock -----------------------------------------------------------------------


def _validate(entry: _Entry) -> None:
    """https://hl7.org/fhir/R4/validation.html, for the resource of a POST or PUT entry (a PATCH is validated
    once applied, inside the transaction)."""
    if entry.resource is None:
        return
    literal_put = entry.method == "PUT" and entry.res_id is not None
    with _blame(entry):
        issues = validation.validate(
            entry.resource,
            expected_type=entry.res_type,
            expected_id=entry.res_id if literal_put else None,
            require_id=literal_put,
            conditional_references=True,
        )
        errors = [i for i in issues if i.severity in ("error", "fatal")]
        if errors:
            raise Invalid(errors)


# -- running the entries -------------------------------------------------------------------------------------


def interaction(entry: _Entry) -> str:
    """The interaction an entry asks for (security/scopes.py INTERACTIONS)."""
    conditional = entry.res_id is None
    if entry.method in ("GET", "HEAD"):
        return "search-type" if conditional else "vread" if entry.version is not None else "read"
    if entry.method == "POST":
        return "conditional-create" if entry.if_none_exist is not None else "create"
    if entry.method == "PUT":
        return "conditional-update" if conditional else "update"
    if entry.method == "PATCH":
        return "conditional-patch" if conditional else "patch"
    return "conditional-delete" if conditional else "delete"


def _authorize(repo: Repository, entry: _Entry) -> None:
    """Each entry is checked as the interaction it is, before anything of the Bundle runs."""
    with _blame(entry, f"{entry.path}.request"):
        repo.check(entry.res_type, interaction(entry))


def _run(repo: Repository, tx: WriteTx, entries: list[_Entry], base_url: str) -> None:
    """Run linked, validated entries in ``tx``: DELETE, then the lookups of conditional creates, updates and
    references, then POST, then PUT/PATCH, then GET/HEAD. Each entry's ``response`` is set."""
    touched: dict[tuple[str, str], int] = {}
    by_phase = sorted(entries, key=lambda e: _PHASE[e.method])
    for entry in by_phase:
        if entry.method == "DELETE":
            with _blame(entry):
                _delete(repo, tx, entry, touched)
    final = _resolve(repo, tx, entries)
    for entry in entries:
        # What the transaction creates may be referred to by its other entries, in whatever order they come.
        if entry.method == "POST" and entry.matched is None and entry.new_id is not None:
            repo.expect_created(entry.res_type, entry.new_id)
        elif entry.created_by_condition and entry.res_id is not None:
            repo.expect_created(entry.res_type, entry.res_id)
    for entry in entries:
        if entry.resource is not None and entry.deferred and not entry.deferred.isdisjoint(final):
            entry.resource = _rewrite_entry(entry, final, {}, set(), set(), [])
    for entry in by_phase:
        if entry.method in ("DELETE", "GET", "HEAD"):
            continue
        with _blame(entry):
            target = entry.new_id if entry.method == "POST" else entry.res_id
            if entry.matched is None and target is not None:
                _touch(touched, entry, entry.res_type, target)
            result = _write(repo, tx, entry)
        entry.response = _written_entry(result, base_url)
    for entry in by_phase:
        if entry.method in ("GET", "HEAD"):
            with _blame(entry):
                entry.response = _get(repo, tx, entry, base_url)


def _touch(touched: dict[tuple[str, str], int], entry: _Entry, res_type: str, res_id: str) -> None:
    """https://hl7.org/fhir/R4/http.html#trules: no two writes of a transaction act on the same resource."""
    other = touched.setdefault((res_type, res_id), entry.index)
    if other != entry.index:
        raise BadRequest(
            f"Bundle.entry[{other}] and Bundle.entry[{entry.index}] both act on {res_type}/{res_id}; a "
            "transaction may touch a resource only once",
            f"{entry.path}.request.url",
        )


def _find_matches(repo: Repository, tx: WriteTx, res_type: str, query: str, header: str, what: str) -> list[Any]:
    matches: list[Any] = repo.matches_in(tx, res_type, query, header)
    if len(matches) > 1:
        raise PreconditionFailed(f"{what} '{query}' matches more than one {res_type}", code="duplicate")
    return matches


def _resolve(repo: Repository, tx: WriteTx, entries: list[_Entry]) -> dict[str, str]:
    """Run the conditions of creates, updates and references against the state after the deletes; return the
    rewrites of the provisional ``Type/id`` and of the ``Type?query`` references."""
    final: dict[str, str] = {}
    local: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
    for entry in entries:
        if entry.method == "POST" and entry.if_none_exist is not None:
            provisional = f"{entry.res_type}/{entry.new_id}"
            with _blame(entry, f"{entry.path}.request.ifNoneExist"):
                found = _find_matches(repo, tx, entry.res_type, entry.if_none_exist, "If-None-Exist", "ifNoneExist")
                local.setdefault(_condition_key(entry.res_type, entry.if_none_exist), provisional)
            if found:
                entry.matched = found[0]
                final[provisional] = f"{entry.res_type}/{found[0].res_id}"
        elif entry.method == "PUT" and entry.res_id is None:
            assert entry.resource is not None and entry.query is not None
            with _blame(entry, f"{entry.path}.request.url"):
                found = _find_matches(repo, tx, entry.res_type, entry.query, "url", "conditional update")
            body_id = entry.resource.get("id")
            if found:
                if body_id is not None and body_id != found[0].res_id:
                    raise BadRequest(
                        f"id '{body_id}' in the resource does not match {entry.res_type}/{found[0].res_id} "
                        "found by the condition",
                        f"{entry.path}.resource.id",
                    )
                entry.res_id = found[0].res_id
            else:
                entry.res_id = body_id if isinstance(body_id, str) else entry.new_id
                entry.created_by_condition = True
            final[f"{entry.res_type}/{entry.new_id}"] = f"{entry.res_type}/{entry.res_id}"
    for entry in entries:
        for token in sorted(entry.deferred):
            if token in final or "?" not in token:
                continue
            where = _locate(entry.resource, token, f"{entry.path}.resource")
            with _blame(entry, where):
                res_type = token.split("?", 1)[0]
                key = _condition_key(res_type, token)
                if key in local:
                    final[token] = final.get(local[key], local[key])
                    continue
                found = repo.matches_in(tx, res_type, token, "reference")
                if len(found) != 1:
                    raise PreconditionFailed(
                        f"conditional reference '{token}' matches {'no' if not found else 'more than one'} {res_type}",
                        code="not-found" if not found else "multiple-matches",
                    )
                final[token] = f"{res_type}/{found[0].res_id}"
    return final


def _delete(repo: Repository, tx: WriteTx, entry: _Entry, touched: dict[tuple[str, str], int]) -> None:
    res_id = entry.res_id
    if res_id is None:
        assert entry.query is not None
        with _blame(entry, f"{entry.path}.request.url"):
            found = _find_matches(repo, tx, entry.res_type, entry.query, "url", "conditional delete")
        res_id = found[0].res_id if found else None
    if res_id is not None:
        _touch(touched, entry, entry.res_type, res_id)
    if entry.if_match is not None:
        current = tx.current(entry.res_type, res_id) if res_id is not None else None
        if current is None or current.deleted or repo.hides(tx, current):
            raise PreconditionFailed(
                f'ifMatch W/"{entry.if_match}" given but there is no {entry.res_type} to delete',
                f"{entry.path}.request.ifMatch",
            )
        if current.version_id != entry.if_match:
            raise PreconditionFailed(
                f'ifMatch W/"{entry.if_match}" does not match the current version {current.version_id} of '
                f"{entry.res_type}/{res_id}",
                f"{entry.path}.request.ifMatch",
            )
    deleted = repo.delete_in(tx, entry.res_type, res_id) if res_id is not None else None
    response: dict[str, Any] = {"status": "204 No Content"}
    if deleted is not None:
        response["etag"] = f'W/"{deleted.version_id}"'
        response["lastModified"] = instant(deleted.last_updated)
    entry.response = orjson.dumps({"response": response})


def _write(repo: Repository, tx: WriteTx, entry: _Entry) -> WriteResult:
    if entry.method == "PATCH":
        assert entry.res_id is not None
        return repo.patch_in(tx, entry.res_type, entry.res_id, entry.patch, if_match=entry.if_match)
    assert entry.resource is not None
    if entry.method == "POST":
        if entry.matched is not None:
            return WriteResult(entry.matched, unchanged=True)
        return repo.create_in(tx, entry.res_type, entry.resource, res_id=entry.new_id, fresh=True)
    assert entry.res_id is not None
    if entry.created_by_condition:
        return repo.create_by_condition_in(tx, entry.res_type, entry.resource, res_id=entry.res_id)
    return repo.update_in(tx, entry.res_type, entry.res_id, entry.resource, if_match=entry.if_match)


def _get(repo: Repository, tx: WriteTx | None, entry: _Entry, base_url: str) -> bytes:
    """read, vread or search (https://hl7.org/fhir/R4/http.html#transaction); inside ``tx`` a transaction's
    reads see its own writes."""
    if entry.res_id is None:
        return _search(repo, tx, entry, base_url)
    if entry.version is None:
        stored = repo.read(entry.res_type, entry.res_id, tx=tx)
    else:
        stored = repo.vread(entry.res_type, entry.res_id, entry.version, tx=tx)
    etag = f'W/"{stored.version_id}"'
    response: dict[str, Any] = {
        "status": "200 OK",
        "etag": etag,
        "lastModified": instant(stored.last_updated),
    }
    if entry.if_none_match in (etag, f'"{stored.version_id}"'):
        response["status"] = "304 Not Modified"
        return orjson.dumps({"response": response})
    # No fullUrl on reads: a read of a resource the same Bundle writes would repeat that entry's fullUrl and
    # versionId, which Bundle invariant bdl-7 forbids; the resource carries its id anyway.
    return _entry_bytes(None, stored.content if entry.method == "GET" else None, response)


def _search(repo: Repository, tx: WriteTx | None, entry: _Entry, base_url: str) -> bytes:
    params = parse_qsl(entry.query or "", keep_blank_values=True)
    with _blame(entry, f"{entry.path}.request.url"):
        if tx is None:
            request, result = repo.search(entry.res_type, params, base_url=base_url)
        else:
            request = repo.search_request(entry.res_type, params, base_url=base_url)
            result = tx.search(request)
            repo.check_included(result)
    body = searchset.searchset_bundle(request, result, base_url)
    return _entry_bytes(None, body if entry.method == "GET" else None, {"status": "200 OK"})


# -- responses -----------------------------------------------------------------------------------------------


def _written_entry(result: WriteResult, base_url: str) -> bytes:
    stored = result.stored
    response = {
        "status": "201 Created" if result.created else "200 OK",
        "location": f"{stored.res_type}/{stored.res_id}/_history/{stored.version_id}",
        "etag": f'W/"{stored.version_id}"',
        "lastModified": instant(stored.last_updated),
    }
    return _entry_bytes(f"{base_url}/{stored.res_type}/{stored.res_id}", stored.content, response)


def _entry_bytes(full_url: str | None, resource: bytes | None, response: dict[str, Any]) -> bytes:
    """One response entry; the resource's stored bytes are spliced in as they are."""
    parts = [b"{"]
    if full_url is not None:
        parts.append(b'"fullUrl":' + orjson.dumps(full_url) + b",")
    if resource is not None:
        parts.append(b'"resource":' + resource + b",")
    parts.append(b'"response":' + orjson.dumps(response) + b"}")
    return b"".join(parts)


def _response_bundle(kind: str, entries: list[bytes]) -> bytes:
    head = orjson.dumps({"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": kind})
    return head[:-1] + b',"entry":[' + b",".join(entries) + b"]}"


def _status_line(status: int) -> str:
    return f"{status} {HTTPStatus(status).phrase}"


def _batch(repo: Repository, raw_entries: list[Any], base_url: str) -> list[bytes]:
    """The response entries of a batch (https://hl7.org/fhir/R4/http.html#brules): each entry succeeds or fails on
    its own, in order, as if it ran alone after the entries before it.

    Parsing, authorization and validation need no database, so they come first. The writes then run in chunks of
    up to ``BATCH_CHUNK`` consecutive entries, one database transaction each, with each entry's audit row written
    at its end as if it had committed alone. An entry that fails abandons its chunk's transaction: the entries
    before it run again in a chunk of their own (the failing one is now first and, failing again, is answered
    with its outcome). So a chunk commits only entries that succeed, each having seen exactly the entries before
    it, at the cost of running those again once per failure. A read (GET, HEAD) ends a chunk and runs outside any
    transaction, on what the entries before it committed.

    A savepoint per entry would spare the rerun, but what the write transaction keeps beside the database (its
    cache of current versions, the locks it holds and its buffered inserts, store/sql.py; the subscriptions hook's
    rules per transaction) would not roll back to it."""
    responses: list[bytes] = [b""] * len(raw_entries)
    ready: list[_Entry] = []
    for index, raw in enumerate(raw_entries):
        try:
            ready.append(_prepare_batch_entry(repo, index, raw, base_url))
        except FhirError as exc:
            responses[index] = _failed_entry(exc)
    position = 0
    while position < len(ready):
        entry = ready[position]
        if entry.method in ("GET", "HEAD"):
            try:
                with _blame(entry):
                    responses[entry.index] = _get(repo, None, entry, base_url)
            except FhirError as exc:
                responses[entry.index] = _failed_entry(exc)
            position += 1
            continue
        end = position
        while end < len(ready) and end - position < BATCH_CHUNK and ready[end].method not in ("GET", "HEAD"):
            end += 1
        position += _run_chunk(repo, ready[position:end], base_url, responses)
    return responses


def _prepare_batch_entry(repo: Repository, index: int, raw: Any, base_url: str) -> _Entry:
    """One entry of a batch, parsed, authorized and validated; a batch does not link its entries."""
    entry = _parse_entry(index, raw, base_url)
    if entry.method == "POST" or (entry.method == "PUT" and entry.res_id is None):
        entry.new_id = time_ordered_id()
    if entry.resource is not None:
        found: set[str] = set()
        entry.resource = _rewrite_entry(entry, {}, {}, set(), found, [])
        entry.deferred = frozenset(found)
    _authorize(repo, entry)
    _validate(entry)
    return entry


class _Abandon(Exception):
    """Rolls back a batch chunk's transaction after one of its entries failed: the entry's position in the chunk
    and its refusal."""

    def __init__(self, position: int, refusal: FhirError) -> None:
        super().__init__(position)
        self.position = position
        self.refusal = refusal


class _ChunkTx:
    """A batch chunk's transaction as its entries see it: the audit rows they add are held and appended together
    when the chunk has run (one statement instead of one per entry), still inside the transaction."""

    def __init__(self, tx: WriteTx) -> None:
        self.tx = tx
        self.audit_rows: list[AuditRow] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tx, name)

    def append_audit(self, rows: Sequence[AuditRow]) -> None:
        self.audit_rows.extend(rows)


def _run_chunk(repo: Repository, chunk: list[_Entry], base_url: str, responses: list[bytes]) -> int:
    """Run the writes of ``chunk`` in one transaction; return how many of its first entries are answered (all of
    them when it commits, fewer after a failure: the caller goes on from the first unanswered one)."""
    while True:
        # _run fills in what it resolves (ids of conditional updates, matches): each attempt starts afresh.
        attempt = [replace(entry) for entry in chunk]
        try:
            with repo.store.write() as tx:
                chunk_tx = _ChunkTx(tx)
                for position, entry in enumerate(attempt):
                    try:
                        _run(repo, cast(WriteTx, chunk_tx), [entry], base_url)
                    except FhirError as exc:
                        raise _Abandon(position, exc) from exc
                    # The entry's audit row (privacy/trail.py), made as when the entry committed alone.
                    while tx.before_commit:
                        tx.before_commit.pop(0)()
                tx.append_audit(chunk_tx.audit_rows)
        except _Abandon as abandoned:
            if abandoned.position == 0:
                # It failed first in its transaction, as it would have alone: that is its answer.
                responses[chunk[0].index] = _failed_entry(abandoned.refusal)
                return 1
            chunk = chunk[: abandoned.position]  # the entries before it, again, without it
            continue
        except Exception:
            if len(chunk) == 1:
                raise
            # Not an entry's refusal (a PostgreSQL deadlock with another writer, the database gone): every entry
            # alone, as a batch ran before chunks; what fails again alone is the server's error.
            for position in range(len(chunk)):
                _run_chunk(repo, chunk[position : position + 1], base_url, responses)
            return len(chunk)
        for entry in attempt:
            responses[entry.index] = entry.response
        return len(chunk)


def _failed_entry(exc: FhirError) -> bytes:
    return orjson.dumps({"response": {"status": _status_line(exc.status), "outcome": exc.outcome}})


# -- errors --------------------------------------------------------------------------------------------------


@contextmanager
def _blame(entry: _Entry, expression: str | None = None) -> Iterator[None]:
    """Point every issue of an error raised inside at the entry: at ``expression`` if given, else translated
    from the expression the repository gave (a header name, ``body``, or a FHIRPath into the resource)."""
    try:
        yield
    except FhirError as exc:
        exc.issues = [
            i
            if i.expression and i.expression.startswith("Bundle.")
            else replace(i, expression=expression or _entry_expression(entry, i.expression))
            for i in exc.issues
        ]
        raise


def _entry_expression(entry: _Entry, expression: str | None) -> str:
    path = entry.path
    if expression is None:
        return path
    header = {
        "If-None-Exist": "request.ifNoneExist",
        "If-Match": "request.ifMatch",
        "url": "request.url",
        "body": "resource",
    }.get(expression)
    if header is not None:
        return f"{path}.{header}"
    head, sep, rest = expression.partition(".")
    if head in definitions.resource_types():
        return f"{path}.resource{sep}{rest}"
    return f"{path}.resource.{expression}"
