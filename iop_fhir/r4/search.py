"""Parses a FHIR search query into a typed, validated ``SearchRequest`` (pure: no database, no Flask).

https://hl7.org/fhir/R4/search.html. ``store/search_sql.py`` runs the request, ``fhir/searchset.py`` builds
the searchset Bundle; ``SearchRequest.query()`` renders the canonical query string of the Bundle's links.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol
from urllib.parse import quote

import orjson

from iop_fhir.errors import BadRequest, NotFound
from iop_fhir.r4 import definitions, indexing
from iop_fhir.r4.indexing import date_range, normalize_string, number_range

# Parameter kinds backed by an index table of store/schema.py (composite and special are not searchable here).
INDEXED_KINDS = frozenset({"token", "reference", "date", "string", "number", "quantity", "uri"})
# Parameters searched on the resources table itself rather than on an index table.
RESOURCE_COLUMNS = frozenset({"_id", "_lastUpdated"})
# https://hl7.org/fhir/R4/search.html#prefix
PREFIXES = frozenset({"eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"})
# https://hl7.org/fhir/R4/search.html#modifiers: what each kind accepts (":Type" on references is apart).
MODIFIERS: dict[str, frozenset[str]] = {
    "token": frozenset({"missing", "not", "text"}),
    "string": frozenset({"missing", "exact", "contains"}),
    "reference": frozenset({"missing"}),
    "date": frozenset({"missing"}),
    "number": frozenset({"missing"}),
    "quantity": frozenset({"missing"}),
    "uri": frozenset({"missing", "below", "above"}),
}
SUMMARY_VALUES = ("true", "text", "data", "count", "false")
# A total the client did not ask for is counted up to this many matches; above it Bundle.total (optional in R4) and
# the last link are left out, so that a broad search costs what its page costs. _total=accurate counts them all.
COUNT_LIMIT = 10_000
TOTAL_VALUES = ("none", "estimate", "accurate")
# ``_totalMethod`` (sent by fhirpy and Aidbox clients for a count): its values as the ``_total`` they ask for.
TOTAL_METHODS = {"count": "accurate", "accurate": "accurate", "estimate": "estimate", "none": "none"}
# https://hl7.org/fhir/R4/search.html#return: what to return rather than what to match.
RESULT_PARAMETERS = frozenset(
    {
        "_count",
        "_offset",
        "_cursor",
        "_sort",
        "_summary",
        "_elements",
        "_total",
        "_totalMethod",
        "_include",
        "_revinclude",
        "_contained",
        "_containedType",
    }
)
# Result parameters accepted without effect here (the views handle the format).
_IGNORED = frozenset({"_format", "_pretty"})
# Resource-level parameters that exist in the specification but that this server does not implement.
_UNSUPPORTED = frozenset(
    {"_has", "_list", "_filter", "_query", "_text", "_content", "_type", "_contained", "_containedType"}
)
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}\Z")  # https://hl7.org/fhir/R4/datatypes.html#id
_ELEMENT = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_NUMBER = re.compile(r"^[+-]?\d+(\.\d+)?([eE][+-]?\d+)?$")
_ESCAPE = re.compile(r"\\([,|$\\])")
# What one search may ask for (https://hl7.org/fhir/R4/search.html#errors lets a server refuse costly searches):
# beyond these, SQLite refuses the statement (an OR of ~500 values passes its expression depth of 1000, a LIKE
# pattern of 50,000 bytes is "too complex") and PostgreSQL plans for seconds (100 chained filters: 3 s).
MAX_FILTERS = 32  # search parameters (AND-ed filters), those dropped as lenient included
MAX_VALUES = 100  # comma-separated values of one parameter (OR-ed)
MAX_INCLUDES = 16  # _include and _revinclude parameters
MAX_INCLUDED = 1000  # resources _include and _revinclude add to one page, the first by type and id
MAX_VALUE_LENGTH = 8192  # characters of one parameter's value
MAX_OFFSET = 2**31 - 1  # _offset: deeper pages are not served


# -- values --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenValue:
    """``system|code``: system None = any system, "" = no system (``|code``); code None = any code."""

    system: str | None
    code: str | None


@dataclass(frozen=True)
class StringValue:
    """A string value (also of token ``:text``): as given, and normalised like ``idx_string.norm``."""

    value: str
    norm: str


@dataclass(frozen=True)
class DateValue:
    """A date value: its prefix and implicit range, both ends inclusive, in microseconds since the epoch."""

    prefix: str
    low: int
    high: int


@dataclass(frozen=True)
class NumberValue:
    """A number or quantity value: prefix, exact number, implicit precision range ``[low, high)``, and for
    quantities the unit (system None = any system; code matches the unit code, or without system the unit)."""

    prefix: str
    value: float
    low: float
    high: float
    system: str | None = None
    code: str | None = None


@dataclass(frozen=True)
class ReferenceValue:
    """``Type/id`` (res_type and res_id), a bare ``id`` (res_type None), or an absolute/canonical ``url``."""

    res_type: str | None = None
    res_id: str | None = None
    url: str | None = None


@dataclass(frozen=True)
class UriValue:
    value: str


Value = TokenValue | StringValue | DateValue | NumberValue | ReferenceValue | UriValue


# -- the request ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filter:
    """One search parameter of the query: its values are OR-ed; the filters of a request are AND-ed.

    ``kind`` is the parameter type (``_id`` is "token", ``_lastUpdated`` "date"; both are searched on the
    resources table). ``modifier`` is one of missing, not, text, exact, contains, below, above or None
    (``:Type`` on a reference sets ``target_type`` instead). With ``missing`` set, ``values`` is empty.
    ``chain`` is the filter on the resources this reference points to (of type ``target_type``), as in
    ``subject:Patient.name=x``.
    """

    name: str  # the parameter as given, with its modifier and chain: the query-string key
    param: str  # the SearchParameter code
    kind: str
    raw: str  # the value as given
    modifier: str | None = None
    values: tuple[Value, ...] = ()
    missing: bool | None = None
    target_type: str | None = None
    chain: Filter | None = None


@dataclass(frozen=True)
class SortKey:
    param: str  # a parameter of an indexed kind, or _id / _lastUpdated
    kind: str
    descending: bool = False


@dataclass(frozen=True)
class Include:
    """``_include=Source:param[:Target]`` or ``_revinclude=...`` (``param`` None: every reference parameter,
    from ``Source:*``; ``source_type`` None too: every type, from ``_include=*``)."""

    source_type: str | None
    param: str | None
    target_type: str | None = None
    iterate: bool = False
    reverse: bool = False

    def render(self) -> tuple[str, str]:
        key = ("_revinclude" if self.reverse else "_include") + (":iterate" if self.iterate else "")
        if self.source_type is None:
            return key, "*"
        value = f"{self.source_type}:{self.param or '*'}"
        return key, value + (f":{self.target_type}" if self.target_type else "")


class Visibility(Protocol):
    """What a request may see (42 CFR Part 2): privacy/restriction.py's Restriction. The store asks it for the SQL
    condition on a resource row (``clause``) or a version row (``version_clause``) at every stage of a query; this
    module only carries it."""

    @property
    def patients(self) -> frozenset[str]: ...

    def clause(self, row: Any) -> Any: ...

    def version_clause(self, row: Any) -> Any: ...


@dataclass(frozen=True)
class Cursor:
    """Where the next page of a paged search starts (the ``_cursor`` of a next link; opaque to clients): the time the
    first page was read (``snapshot``), and the sort keys and id of the last entry served, ``missing`` when the
    entries with a value of the first ``_sort`` key were all served and the last one had none
    (store/search_sql.py explains the rule)."""

    snapshot: int
    missing: bool
    keys: tuple[str | int | float | None, ...]
    res_id: str

    def encode(self) -> str:
        data = orjson.dumps([self.snapshot, self.missing, list(self.keys), self.res_id])
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    @classmethod
    def decode(cls, key: str, text: str) -> Cursor:
        """The cursor ``text`` encodes; ``BadRequest`` when it is not one this server wrote."""
        try:
            snapshot, missing, keys, res_id = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            if not (
                type(snapshot) is int
                and type(missing) is bool
                and isinstance(keys, list)
                and all(k is None or type(k) in (str, int, float) for k in keys)
                and isinstance(res_id, str)
            ):
                raise ValueError(text)
        except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
            raise BadRequest(f"{key}: not a page cursor of this server", key) from None
        return cls(snapshot, missing, tuple(keys), res_id)


@dataclass(frozen=True)
class SearchRequest:
    """A validated search on one resource type (https://hl7.org/fhir/R4/search.html)."""

    res_type: str
    filters: tuple[Filter, ...] = ()
    sort: tuple[SortKey, ...] = ()
    count: int = 20  # page size, already capped; 0 asks for the total only
    offset: int = 0
    cursor: Cursor | None = None  # a next page, from a next link; _offset is then 0
    includes: tuple[Include, ...] = ()  # every _include and _revinclude, in the order given
    summary: str | None = None  # true | text | data | count | false
    elements: tuple[str, ...] = ()
    total: str | None = None  # none | estimate | accurate
    ignored: tuple[str, ...] = ()  # parameters dropped under Prefer: handling=lenient, as given
    restriction: Visibility | None = None  # set by the repository for a partner's request, never by the client
    # A compartment search (``Patient/{id}/{type}``): the filters that put a resource in the compartment, OR-ed
    # (https://hl7.org/fhir/R4/compartmentdefinition.html); set by the repository, never by the query string.
    compartment: tuple[Filter, ...] = ()

    @property
    def wants_total(self) -> bool:
        """Whether to count the total: ``_total=accurate|estimate``, ``_summary=count`` or ``_count=0``."""
        if self.summary == "count":
            return True
        if self.total is None:
            return self.count == 0
        return self.total != "none"

    def query(self, *, offset: int | None = None, count: int | None = None, cursor: Cursor | None = None) -> str:
        """The canonical query string: the filters as given (less those ignored), then the result parameters,
        then ``_count`` and (when not 0) ``_offset``, or the ``_cursor`` of a next page. Without arguments: this page's
        own (the self link)."""
        if offset is None and cursor is None:
            offset, cursor = self.offset, self.cursor
        offset = offset or 0
        count = self.count if count is None else count
        pairs = [(f.name, f.raw) for f in self.filters]
        if self.sort:
            pairs.append(("_sort", ",".join(("-" if s.descending else "") + s.param for s in self.sort)))
        pairs.extend(i.render() for i in self.includes)
        if self.summary is not None:
            pairs.append(("_summary", self.summary))
        if self.elements:
            pairs.append(("_elements", ",".join(self.elements)))
        if self.total is not None:
            pairs.append(("_total", self.total))
        pairs.append(("_count", str(count)))
        if cursor is not None:
            pairs.append(("_cursor", cursor.encode()))
        elif offset:
            pairs.append(("_offset", str(offset)))
        return "&".join(f"{_quote(k)}={_quote(v)}" for k, v in pairs)


def is_id(text: str) -> bool:
    """Whether ``text`` is a FHIR id (https://hl7.org/fhir/R4/datatypes.html#id)."""
    return bool(_ID.match(text))


def id_filter(res_id: str) -> Filter:
    """``_id=res_id``, for looking one resource up through a search (and its restriction)."""
    return Filter("_id", "_id", "token", res_id, values=(TokenValue(None, res_id),))


def _quote(text: str) -> str:
    # ":" "/" "," "*" are legal in a query and keep links readable; "|" is not, so it is escaped.
    return quote(text, safe=":/,*")


# -- parsing -------------------------------------------------------------------------------------------------


def parse(
    res_type: str,
    params: list[tuple[str, str]],
    *,
    lenient: bool = False,
    default_count: int = 20,
    max_count: int = 1000,
    base_url: str | None = None,
) -> SearchRequest:
    """Validate and type the parameters of a search on ``res_type`` (already URL-decoded, in request order).

    Unknown or unsupported parameters and modifiers raise ``BadRequest`` (code ``not-supported``), or with
    ``lenient`` are dropped and listed in ``ignored``; malformed values always raise ``BadRequest``
    (``invalid``); the issue's expression is the parameter as given (https://hl7.org/fhir/R4/search.html#errors).
    A parameter with an empty value (``name=``) is ignored, as common servers do. ``base_url`` lets a reference
    given as an absolute URL on this server match the relative references it stands for. A search larger than
    ``MAX_FILTERS``, ``MAX_VALUES``, ``MAX_INCLUDES`` or ``MAX_VALUE_LENGTH`` raises ``BadRequest`` (``too-costly``);
    ``_count`` above ``max_count`` is capped; a NUL character anywhere is refused.
    """
    if res_type not in definitions.resource_types():
        raise NotFound(f"Unknown resource type '{res_type}'", code="not-supported")
    filters: list[Filter] = []
    ignored: list[str] = []
    includes: list[Include] = []
    single: dict[str, tuple[str, str]] = {}  # result parameters that take one value: the last one given wins
    for key, value in params:
        if "\x00" in key or "\x00" in value:
            raise BadRequest(f"'{_short(key)}': a search parameter cannot contain a NUL character", key)
        if value == "":
            continue
        if len(value) > MAX_VALUE_LENGTH:
            raise BadRequest(
                f"{_short(key)}: the value is {len(value)} characters long; at most {MAX_VALUE_LENGTH} are accepted",
                key,
                code="too-costly",
            )
        base = key.split(":", 1)[0]
        if base in _IGNORED:
            continue
        try:
            if base in ("_include", "_revinclude"):
                includes.append(_parse_include(res_type, key, value))
            elif base in ("_count", "_offset", "_cursor", "_sort", "_summary", "_elements", "_total", "_totalMethod"):
                if ":" in key:
                    raise _NotSupported(f"'{key}': result parameter {base} takes no modifier")
                single[base] = (key, value)
            else:
                filters.append(_parse_filter(res_type, key, value, base_url))
        except _NotSupported as exc:
            if not lenient:
                raise BadRequest(str(exc), key, code="not-supported") from None
            ignored.append(key)
        if len(filters) + len(ignored) > MAX_FILTERS:  # those dropped as lenient count too
            raise BadRequest(
                f"a search may have at most {MAX_FILTERS} search parameters, counting those ignored; this one has more",
                key,
                code="too-costly",
            )

    _check_size(filters, MAX_FILTERS, "search parameters")
    _check_size(includes, MAX_INCLUDES, "_include and _revinclude parameters")
    count = default_count
    if "_count" in single:
        count = min(non_negative(*single["_count"]), max_count)  # above the maximum: capped, not refused
    offset = 0
    if "_offset" in single:
        key, value = single["_offset"]
        offset = non_negative(key, value)
        if offset > MAX_OFFSET:
            raise BadRequest(f"{key}: '{_short(value)}' is beyond the deepest offset served, {MAX_OFFSET}", key)
    cursor = Cursor.decode(*single["_cursor"]) if "_cursor" in single else None
    if cursor is not None:
        offset = 0  # a next link's cursor says where the page starts
    summary = _choice(*single["_summary"], SUMMARY_VALUES) if "_summary" in single else None
    total = _choice(*single["_total"], TOTAL_VALUES) if "_total" in single else None
    if "_totalMethod" in single and total is None:  # _total, when both are given, is the standard one
        total = TOTAL_METHODS[_choice(*single["_totalMethod"], tuple(TOTAL_METHODS))]
    elements: tuple[str, ...] = ()
    if "_elements" in single:
        key, value = single["_elements"]
        elements = tuple(e.strip() for e in value.split(",") if e.strip())
        bad = [e for e in elements if not _ELEMENT.match(e)]
        if bad:
            raise BadRequest(f"_elements: '{bad[0]}' is not an element name", key)
        if summary not in (None, "false"):
            raise BadRequest("_elements cannot be combined with _summary", key)
    sort: tuple[SortKey, ...] = ()
    if "_sort" in single:
        try:
            sort = _parse_sort(res_type, *single["_sort"])
        except _NotSupported as exc:
            raise BadRequest(str(exc), single["_sort"][0], code="not-supported") from None
    return SearchRequest(
        res_type=res_type,
        filters=tuple(filters),
        sort=sort,
        count=count,
        offset=offset,
        cursor=cursor,
        includes=tuple(includes),
        summary=summary,
        elements=elements,
        total=total,
        ignored=tuple(ignored),
    )


def token_value(system: Any, code: Any) -> str:
    """A token search value ``system|code`` with both parts escaped (https://hl7.org/fhir/R4/search.html#escaping)."""
    return f"{_escape_part(system)}|{_escape_part(code)}"


def _escape_part(value: Any) -> str:
    text = str(value)
    for char in ("\\", "|", ",", "$"):
        text = text.replace(char, "\\" + char)
    return text


class _NotSupported(Exception):
    """An unknown or unsupported parameter or modifier: dropped when lenient, else a not-supported error."""


def non_negative(key: str, value: str) -> int:
    """A non-negative integer parameter (``_count``, ``_offset``): ASCII digits only (``int`` would also take
    "+1", " 1", "1_0" and other scripts' digits); values past 10**18 come back as 10**18, for the caller to cap
    or refuse (``int`` refuses more than 4300 digits)."""
    if not (value.isascii() and value.isdigit()):
        raise BadRequest(f"{key}: '{_short(value)}' is not a non-negative integer", key)
    digits = value.lstrip("0")
    return int(digits or "0") if len(digits) <= 18 else 10**18


def _check_size(items: list[Filter] | list[Include], limit: int, what: str) -> None:
    if len(items) > limit:
        first = items[limit]
        key = first.name if isinstance(first, Filter) else first.render()[0]
        raise BadRequest(f"a search may have at most {limit} {what}; this one has {len(items)}", key, code="too-costly")


def _short(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise BadRequest(f"{key}: '{value}' is not one of {', '.join(allowed)}", key)
    return value


@cache
def _searchable(res_type: str) -> dict[str, definitions.SearchParam]:
    """The parameters of ``res_type`` this server can search: ``_id``, ``_lastUpdated`` (on the resources
    table) and every parameter of an indexed kind that r4/indexing.py extracts rows for."""
    params = definitions.search_params(res_type)
    found = {name: params[name] for name in RESOURCE_COLUMNS if name in params}
    found.update(
        (name, p)
        for name, p in indexing.indexed_params(res_type).items()
        if p.type in INDEXED_KINDS and name not in _UNSUPPORTED
    )
    return found


def _lookup(res_type: str, name: str, key: str) -> definitions.SearchParam:
    param = _searchable(res_type).get(name)
    if param is not None:
        return param
    known = definitions.search_params(res_type).get(name)
    if known is not None or name in _UNSUPPORTED:
        kind = f" ({known.type})" if known is not None else ""
        raise _NotSupported(f"Search parameter '{name}'{kind} is not supported on {res_type}")
    raise _NotSupported(f"Unknown search parameter '{name}' for {res_type}")


def _parse_filter(res_type: str, key: str, value: str, base_url: str | None) -> Filter:
    head, dot, tail = key.partition(".")
    name, _, modifier = head.partition(":")
    param = _lookup(res_type, name, key)
    if dot:
        return _parse_chain(res_type, key, value, param, modifier, tail, base_url)
    return _parse_simple(key, key, value, param, modifier, base_url)


def _parse_simple(
    name: str, key: str, value: str, param: definitions.SearchParam, modifier: str, base_url: str | None
) -> Filter:
    """One parameter without chain; ``name`` is what the filter is called in the query, ``key`` the whole
    parameter as given (named in errors)."""
    kind = param.type
    target_type: str | None = None
    if modifier and kind == "reference" and modifier in definitions.resource_types():
        if param.target and modifier not in param.target:
            raise BadRequest(f"{key}: {modifier} is not a target type of {param.name}", key)
        target_type, modifier = modifier, ""
    on_resource = param.name in RESOURCE_COLUMNS
    if modifier and (modifier not in MODIFIERS[kind] or (on_resource and modifier != "missing")):
        raise _NotSupported(f"Modifier ':{modifier}' is not supported on the {kind} parameter '{param.name}'")
    if modifier == "missing":
        if value not in ("true", "false"):
            raise BadRequest(f"{key}: ':missing' takes true or false, not '{value}'", key)
        return Filter(name, param.name, kind, value, "missing", missing=value == "true")
    parse_one = _value_parser(kind, modifier, param, target_type, key, base_url)
    alternatives = split_values(value)
    if len(alternatives) > MAX_VALUES:
        raise BadRequest(
            f"{key}: {len(alternatives)} comma-separated values; at most {MAX_VALUES} are accepted",
            key,
            code="too-costly",
        )
    if "" in alternatives:
        raise BadRequest(f"{key}: '{value}' has an empty value in its comma-separated list", key)
    values = tuple(parse_one(v) for v in alternatives)
    return Filter(name, param.name, kind, value, modifier or None, values, target_type=target_type)


def _parse_chain(
    res_type: str,
    key: str,
    value: str,
    param: definitions.SearchParam,
    type_modifier: str,
    tail: str,
    base_url: str | None,
) -> Filter:
    """``subject:Patient.name=x``: one level of chaining (https://hl7.org/fhir/R4/search.html#chaining)."""
    if param.type != "reference":
        raise BadRequest(f"{key}: only reference parameters can be chained, '{param.name}' is {param.type}", key)
    if "." in tail:
        raise _NotSupported(f"'{key}': chains deeper than one level are not supported")
    chained_name, _, chained_modifier = tail.partition(":")
    targets = param.target or tuple(sorted(definitions.resource_types()))
    if type_modifier:
        if type_modifier not in definitions.resource_types() or type_modifier not in targets:
            raise BadRequest(f"{key}: '{type_modifier}' is not a target type of {param.name}", key)
        target = type_modifier
    else:
        having = [t for t in targets if chained_name in _searchable(t)]
        if not having:
            raise _NotSupported(f"'{key}': no target type of {param.name} has a parameter '{chained_name}'")
        if len(having) > 1:
            raise BadRequest(
                f"'{key}' is ambiguous: {chained_name} exists on {', '.join(having)}; "
                f"name the type, e.g. {param.name}:{having[0]}.{tail}",
                key,
            )
        target = having[0]
    chained_param = _lookup(target, chained_name, key)
    chained = _parse_simple(tail, key, value, chained_param, chained_modifier, base_url)
    return Filter(key, param.name, "reference", value, None, target_type=target, chain=chained)


def split_values(value: str, separator: str = ",") -> list[str]:
    """Split at each ``separator`` not escaped with a backslash, keeping the escapes for ``unescape``
    (https://hl7.org/fhir/R4/search.html#escaping)."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(value)
    for ch in chars:
        if ch == "\\":
            current.append(ch + next(chars, ""))
        elif ch == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _split_pipe(value: str) -> list[str]:
    """Split one (comma-split) value at unescaped ``|``, then undo the escapes."""
    return [unescape(p) for p in split_values(value, "|")]


def unescape(value: str) -> str:
    """Undo the search escapes ``\\,`` ``\\|`` ``\\$`` ``\\\\``."""
    return _ESCAPE.sub(r"\1", value)


def _value_parser(
    kind: str,
    modifier: str,
    param: definitions.SearchParam,
    target_type: str | None,
    key: str,
    base_url: str | None,
) -> Callable[[str], Value]:
    def invalid(message: str) -> BadRequest:
        return BadRequest(f"{key}: {message}", key)

    def token(raw: str) -> Value:
        if modifier == "text":
            return StringValue(unescape(raw), normalize_string(unescape(raw)))
        if param.name == "_id":
            if not _ID.match(raw):
                raise invalid(f"'{raw}' is not a resource id")
            return TokenValue(None, raw)
        parts = _split_pipe(raw)
        if len(parts) == 1:
            return TokenValue(None, parts[0])
        if len(parts) != 2:
            raise invalid(f"'{raw}' is not [system]|[code]")
        system, code = parts
        if not system and not code:
            raise invalid(f"'{raw}' names neither a system nor a code")
        return TokenValue(system, code or None)

    def string(raw: str) -> Value:
        text = unescape(raw)
        return StringValue(text, normalize_string(text))

    def date(raw: str) -> Value:
        prefix, rest = _prefix(raw)
        if prefix == "ap":
            raise _NotSupported(f"'{key}': the ap prefix is not supported on dates")
        try:
            low, high = date_range(rest.replace(" ", "+"))  # an unencoded "+" arrives as a space
        except ValueError:
            raise invalid(f"'{raw}' is not a date, dateTime or instant") from None
        return DateValue(prefix, low, high)

    def number(raw: str) -> Value:
        prefix, rest = _prefix(raw)
        system = code = None
        if kind == "quantity":
            parts = _split_pipe(rest)
            if len(parts) == 3:
                rest, system, code = parts[0], parts[1] or None, parts[2] or None
            elif len(parts) != 1:
                raise invalid(f"'{raw}' is not [prefix]number|system|code")
        if not _NUMBER.match(rest):
            raise invalid(f"'{raw}' is not a {kind}")
        try:
            value, low, high = number_range(rest)
        except ValueError:
            raise invalid(f"'{raw}' is beyond the range of numbers searched (about 1e308)") from None
        return NumberValue(prefix, value, low, high, system, code)

    def reference(raw: str) -> Value:
        text = unescape(raw)
        if base_url and text.startswith(base_url.rstrip("/") + "/"):
            text = text[len(base_url.rstrip("/")) + 1 :]
        if "://" in text or text.startswith(("urn:", "#")):
            return ReferenceValue(url=text)
        parts = text.split("/")
        ref_type: str | None
        if len(parts) in (2, 4) and (len(parts) == 2 or parts[2] == "_history"):
            ref_type, ref_id = parts[0], parts[1]
            if ref_type not in definitions.resource_types():
                raise invalid(f"'{raw}': '{ref_type}' is not a resource type")
            if target_type and ref_type != target_type:
                raise invalid(f"'{raw}' does not refer to a {target_type}")
            if param.target and ref_type not in param.target:
                raise invalid(f"'{raw}': {ref_type} is not a target type of {param.name}")
        elif len(parts) == 1:
            ref_type = target_type or (param.target[0] if len(param.target) == 1 else None)
            ref_id = text
        else:
            raise invalid(f"'{raw}' is not Type/id, id or an absolute URL")
        if not _ID.match(ref_id):
            raise invalid(f"'{raw}': '{ref_id}' is not a resource id")
        return ReferenceValue(ref_type, ref_id)

    def uri(raw: str) -> Value:
        return UriValue(unescape(raw))

    parsers: dict[str, Callable[[str], Value]] = {
        "token": token,
        "string": string,
        "date": date,
        "number": number,
        "quantity": number,
        "reference": reference,
        "uri": uri,
    }
    return parsers[kind]


def _prefix(raw: str) -> tuple[str, str]:
    if raw[:2] in PREFIXES:
        return raw[:2], raw[2:]
    return "eq", raw


def _parse_include(res_type: str, key: str, value: str) -> Include:
    """https://hl7.org/fhir/R4/search.html#include"""
    base, _, modifier = key.partition(":")
    reverse = base == "_revinclude"
    if modifier not in ("", "iterate", "recurse"):
        raise _NotSupported(f"Modifier ':{modifier}' is not supported on {base}; use :iterate")
    iterate = modifier != ""
    if value == "*":
        if reverse:
            raise BadRequest(f"{key}: '*' is not supported; give Type:param or Type:*", key)
        return Include(None, None, None, iterate, reverse)
    parts = value.split(":")
    if len(parts) not in (2, 3):
        raise BadRequest(f"{key}: '{value}' is not SourceType:parameter[:TargetType]", key)
    source, name = parts[0], parts[1]
    target = parts[2] if len(parts) == 3 else None
    if "AuditEvent" in (source, target) and res_type != "AuditEvent":
        # AuditEvents are rendered from the audit log, not stored with the resources they name: no include finds them.
        raise _NotSupported(f"{key}: AuditEvents are not included; search AuditEvent?entity=Type/id instead")
    types = definitions.resource_types()
    if source not in types:
        raise BadRequest(f"{key}: '{source}' is not a resource type", key)
    if not reverse and not iterate and source != res_type:
        raise BadRequest(f"{key}: {source} is not the type searched ({res_type}); use {base}:iterate", key)
    if target is not None and target not in types:
        raise BadRequest(f"{key}: '{target}' is not a resource type", key)
    if name == "*":
        return Include(source, None, target, iterate, reverse)
    param = definitions.search_params(source).get(name)
    if param is None or param.type != "reference":
        raise BadRequest(f"{key}: '{name}' is not a reference parameter of {source}", key)
    if target is not None and param.target and target not in param.target:
        raise BadRequest(f"{key}: {target} is not a target type of {source}:{name}", key)
    if reverse and not iterate and param.target and res_type not in param.target and target is None:
        raise BadRequest(f"{key}: {source}:{name} cannot refer to {res_type}", key)
    return Include(source, name, target, iterate, reverse)


def _parse_sort(res_type: str, key: str, value: str) -> tuple[SortKey, ...]:
    """https://hl7.org/fhir/R4/search.html#sort"""
    keys: list[SortKey] = []
    for item in value.split(","):
        item = item.strip()
        descending = item.startswith("-")
        name = item[1:] if descending else item
        if not name:
            raise BadRequest(f"{key}: '{value}' has an empty sort key", key)
        param = _searchable(res_type).get(name)
        if param is None:
            _lookup(res_type, name, key)  # raises: unknown or unsupported
            raise AssertionError  # pragma: no cover
        if any(k.param == name for k in keys):
            raise BadRequest(f"{key}: '{name}' is given twice", key)
        keys.append(SortKey(name, param.type, descending))
    return tuple(keys)
