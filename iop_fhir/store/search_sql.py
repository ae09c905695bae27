"""Runs a parsed search (r4/search.py) as SQL over the index tables of store/schema.py.

SQLAlchemy Core only, the same results on SQLite and PostgreSQL. Every filter is an ``IN`` (or, negated, a
``NOT EXISTS``) subquery on one index table narrowed by ``res_type`` and ``param`` first, so the
``ix_<table>_value`` indexes drive it. https://hl7.org/fhir/R4/search.html
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    FromClause,
    Select,
    Table,
    and_,
    exists,
    false,
    func,
    or_,
    select,
    true,
)

from iop_fhir.r4.search import (
    DateValue,
    Filter,
    Include,
    NumberValue,
    ReferenceValue,
    SearchRequest,
    SortKey,
    StringValue,
    TokenValue,
    UriValue,
    Visibility,
)
from iop_fhir.store import schema
from iop_fhir.store.base import SearchResult, StoredResource

# _include/_revinclude bounds (https://hl7.org/fhir/R4/search.html#revinclude: servers may limit iteration).
MAX_INCLUDE_ROUNDS = 4  # the first round plus three rounds of :iterate
MAX_INCLUDED = 1000

_R = schema.resources
_REF = schema.idx_reference
# The column each index kind sorts on: (ascending, descending); min of the first / max of the second.
_SORT_COLUMNS: dict[str, tuple[str, str]] = {
    "token": ("code", "code"),
    "string": ("norm", "norm"),
    "date": ("low", "high"),
    "number": ("value", "value"),
    "quantity": ("value", "value"),
    "reference": ("target_id", "target_id"),
    "uri": ("value", "value"),
}


def run(conn: Connection, request: SearchRequest) -> SearchResult:
    """One page of matches (``_count`` from ``_offset``, one more fetched to know whether a next page exists),
    what ``_include``/``_revinclude`` add, and the total unless ``_total=none`` (counted when asked for or when
    there is more than one page; known for free on a single or last page)."""
    query = _Query(conn.dialect.name == "sqlite", request.restriction)
    r = _R
    where = [r.c.res_type == request.res_type, r.c.deleted == false()]
    where += [query.condition(request.res_type, f, r) for f in request.filters]
    if request.compartment:
        where.append(or_(*[query.condition(request.res_type, f, r) for f in request.compartment]))
    if request.restriction is not None:
        where.append(request.restriction.clause(r))
    result = SearchResult()
    if request.wants_total:
        result.total = conn.execute(select(func.count()).select_from(r).where(*where)).scalar_one()
    if request.summary == "count" or request.count == 0:
        return result
    page = (
        select(r.c.res_type, r.c.res_id, r.c.version_id, r.c.last_updated, r.c.content)
        .where(*where)
        .order_by(*_order(request, r, query.sqlite))
        .limit(request.count + 1)
        .offset(request.offset)
    )
    rows = conn.execute(page).all()
    result.has_more = len(rows) > request.count
    result.matches = [_stored(row) for row in rows[: request.count]]
    if result.total is None and request.total != "none":
        if not result.has_more and (result.matches or request.offset == 0):  # the last page: the total is free
            result.total = request.offset + len(result.matches)
        else:  # every page of a multi-page search tells the total, counted as _total=accurate counts it
            result.total = conn.execute(select(func.count()).select_from(r).where(*where)).scalar_one()
    if request.includes and result.matches:
        result.included = _include(conn, request.includes, result.matches, request.restriction)
    return result


# -- Part 2 visibility: the condition comes from the request's restriction (privacy/restriction.py) ---------------


def _only_visible(conn: Connection, found: list[StoredResource], restriction: Visibility) -> list[StoredResource]:
    """``found`` less what ``restriction`` hides (included resources: they count in no total)."""
    if not found:
        return found
    by_type: dict[str, list[str]] = defaultdict(list)
    for res in found:
        by_type[res.res_type].append(res.res_id)
    shown: set[tuple[str, str]] = set()
    for res_type, ids in by_type.items():
        query = select(_R.c.res_type, _R.c.res_id).where(
            _R.c.res_type == res_type, _R.c.res_id.in_(ids), restriction.clause(_R)
        )
        shown.update((row.res_type, row.res_id) for row in conn.execute(query))
    return [res for res in found if (res.res_type, res.res_id) in shown]


def _stored(row: Any) -> StoredResource:
    return StoredResource(row.res_type, row.res_id, row.version_id, row.last_updated, False, bytes(row.content))


# -- filters -------------------------------------------------------------------------------------------------


class _Query:
    """Builds the WHERE clause of each filter; knows the dialect only to add an index-friendly range to
    string prefix matches on SQLite (where LIKE cannot use a BINARY index)."""

    def __init__(self, sqlite: bool, restriction: Visibility | None = None) -> None:
        self.sqlite = sqlite
        # A chain's inner search sees what the request may see, at every hop.
        self.restriction = restriction

    def condition(self, res_type: str, f: Filter, r: FromClause) -> ColumnElement[bool]:
        """Whether the resource row ``r`` (of type ``res_type``) satisfies ``f``."""
        if f.param == "_id":
            if f.missing is not None:
                return false() if f.missing else true()
            ids = [v.code for v in f.values if isinstance(v, TokenValue)]
            return r.c.res_id.in_(ids)
        if f.param == "_lastUpdated":
            if f.missing is not None:
                return false() if f.missing else true()
            column = r.c.last_updated
            return or_(*[_date(v, column, column) for v in f.values if isinstance(v, DateValue)])
        table = schema.INDEX_TABLES[f.kind]
        scope = select(table.c.res_id).where(table.c.res_type == res_type, table.c.param == f.param)
        if f.missing is not None:
            if f.missing:
                return ~exists(scope.where(table.c.res_id == r.c.res_id))
            return r.c.res_id.in_(scope)
        if f.chain is not None:
            return r.c.res_id.in_(self._chain(res_type, f))
        matching = scope.where(or_(*[self._value(f, table, v) for v in f.values]))
        if f.modifier == "not":
            return ~exists(matching.where(table.c.res_id == r.c.res_id))
        return r.c.res_id.in_(matching)

    def _chain(self, res_type: str, f: Filter) -> Select[Any]:
        """Resources whose reference ``f.param`` points to a live ``f.target_type`` satisfying ``f.chain``
        (https://hl7.org/fhir/R4/search.html#chaining)."""
        assert f.chain is not None and f.target_type is not None
        target = _R.alias("target")
        targets = select(target.c.res_id).where(
            target.c.res_type == f.target_type,
            target.c.deleted == false(),
            self.condition(f.target_type, f.chain, target),
            *([self.restriction.clause(target)] if self.restriction is not None else []),
        )
        return select(_REF.c.res_id).where(
            _REF.c.res_type == res_type,
            _REF.c.param == f.param,
            _REF.c.target_type == f.target_type,
            _REF.c.target_id.in_(targets),
        )

    def _value(self, f: Filter, table: Table, v: Any) -> ColumnElement[bool]:
        c = table.c
        if isinstance(v, TokenValue):
            parts = [] if v.code is None else [c.code == v.code]
            if v.system == "":
                parts.append(c.system.is_(None))
            elif v.system is not None:
                parts.append(c.system == v.system)
            return and_(*parts)
        if isinstance(v, StringValue):
            if f.kind == "token":  # :text, on the lower-cased display
                return c.text.contains(v.value.lower(), autoescape=True)
            if f.modifier == "exact":
                return c.exact == v.value
            if f.modifier == "contains":
                return c.norm.contains(v.norm, autoescape=True)
            return self._starts_with(c.norm, v.norm)
        if isinstance(v, DateValue):
            return _date(v, c.low, c.high)
        if isinstance(v, NumberValue):
            return _number(v, c)
        if isinstance(v, ReferenceValue):
            if v.url is not None:
                return c.url == v.url
            parts = [c.target_id == v.res_id]
            res_type = v.res_type or f.target_type
            if res_type is not None:
                parts.append(c.target_type == res_type)
            return and_(*parts)
        if isinstance(v, UriValue):
            if f.modifier == "below":
                # substr rather than LIKE: LIKE ignores ASCII case on SQLite, and uris are case-sensitive.
                return func.substr(c.value, 1, len(v.value)) == v.value
            if f.modifier == "above":
                return c.value.in_(_uri_ancestors(v.value))
            return c.value == v.value
        raise TypeError(f"no SQL for {v!r}")  # pragma: no cover

    def _starts_with(self, column: Any, prefix: str) -> ColumnElement[bool]:
        like: ColumnElement[bool] = column.startswith(prefix, autoescape=True)
        if not self.sqlite or not prefix or ord(prefix[-1]) >= 0x10FFFF:
            return like
        # SQLite's LIKE cannot use an index on a BINARY column; the equivalent code-point range can. After U+D7FF
        # comes U+E000: the surrogates between cannot be encoded as UTF-8 (nor stored).
        following = ord(prefix[-1]) + 1
        upper = prefix[:-1] + chr(0xE000 if 0xD800 <= following <= 0xDFFF else following)
        return and_(column >= prefix, column < upper, like)


def _date(v: DateValue, low: Any, high: Any) -> ColumnElement[bool]:
    """Range comparison of the resource's [low, high] with the value's (https://hl7.org/fhir/R4/search.html#prefix)."""
    within = and_(low >= v.low, high <= v.high)
    clauses: dict[str, Callable[[], ColumnElement[bool]]] = {
        "eq": lambda: within,
        "ne": lambda: or_(low < v.low, high > v.high),
        "gt": lambda: high > v.high,
        "lt": lambda: low < v.low,
        "ge": lambda: or_(high > v.high, within),
        "le": lambda: or_(low < v.low, within),
        "sa": lambda: low > v.high,
        "eb": lambda: high < v.low,
    }
    return clauses[v.prefix]()


def _number(v: NumberValue, c: Any) -> ColumnElement[bool]:
    """https://hl7.org/fhir/R4/search.html#number: eq/ne use the search value's implicit precision range
    [low, high); gt/lt/ge/le compare with the exact value; sa/eb need the stored range wholly above/below."""
    value = c.value
    if v.prefix == "ap":
        spread = abs(v.value) * 0.1 or (v.high - v.low) / 2
        clause = and_(value >= v.value - spread, value <= v.value + spread)
    else:
        clauses: dict[str, Callable[[], ColumnElement[bool]]] = {
            "eq": lambda: and_(value >= v.low, value < v.high),
            "ne": lambda: or_(value < v.low, value >= v.high),
            "gt": lambda: value > v.value,
            "lt": lambda: value < v.value,
            "ge": lambda: value >= v.value,
            "le": lambda: value <= v.value,
            "sa": lambda: c.low >= v.high,
            "eb": lambda: c.high <= v.low,
        }
        clause = clauses[v.prefix]()
    if v.system is not None:
        clause = and_(clause, c.system == v.system)
    if v.code is not None:
        clause = and_(clause, c.code == v.code if v.system is not None else or_(c.code == v.code, c.unit == v.code))
    return clause


def _uri_ancestors(uri: str) -> list[str]:
    """``uri`` and every path prefix of it, for ``:above`` (https://hl7.org/fhir/R4/search.html#uri)."""
    start = uri.find("://")
    start = start + 3 if start >= 0 else 0
    prefixes = [uri[:i] for i in range(start, len(uri)) if uri[i] == "/"]
    return [*prefixes, uri]


# -- order ---------------------------------------------------------------------------------------------------


def _order(request: SearchRequest, r: FromClause, sqlite: bool) -> list[Any]:
    """``_sort`` keys (missing values last) then res_id so that pages are stable; by default oldest first."""
    if not request.sort:
        if sqlite and request.filters:
            # SQLite's planner, without statistics, prefers walking ix_resources_type_updated in order over
            # looking the filters up in their index tables: a scan of the whole type. "+ 0" makes the sort key
            # unindexable, so the filters drive the query and only their matches are sorted.
            return [r.c.last_updated + 0, r.c.res_id]
        return [r.c.last_updated, r.c.res_id]
    keys: list[Any] = []
    for key in request.sort:
        column = _sort_column(request.res_type, key, r)
        keys.append(column.desc().nulls_last() if key.descending else column.asc().nulls_last())
    return [*keys, r.c.res_id]


def _sort_column(res_type: str, key: SortKey, r: FromClause) -> Any:
    if key.param == "_id":
        return r.c.res_id
    if key.param == "_lastUpdated":
        return r.c.last_updated
    table = schema.INDEX_TABLES[key.kind]
    ascending, descending = _SORT_COLUMNS[key.kind]
    column: Any = table.c[descending if key.descending else ascending]
    if key.kind == "reference":
        column = func.coalesce(table.c.target_id, table.c.url)
    aggregate = func.max(column) if key.descending else func.min(column)
    return (
        select(aggregate)
        .where(table.c.res_type == res_type, table.c.res_id == r.c.res_id, table.c.param == key.param)
        .scalar_subquery()
    )


# -- _include / _revinclude ----------------------------------------------------------------------------------


def _include(
    conn: Connection, rules: Sequence[Include], matches: list[StoredResource], restriction: Visibility | None
) -> list[StoredResource]:
    """Apply every rule to the matches, then the ``:iterate`` rules to what the previous round added, until
    nothing new comes or a bound is reached; nothing is returned twice, nor a match again
    (https://hl7.org/fhir/R4/search.html#include). Under a restriction each round keeps only what may be seen,
    so that no round iterates from a hidden resource."""
    seen = {(m.res_type, m.res_id) for m in matches}
    included: list[StoredResource] = []
    frontier = matches
    for round_ in range(MAX_INCLUDE_ROUNDS):
        active = [rule for rule in rules if round_ == 0 or rule.iterate]
        if not active or not frontier:
            break
        by_type: dict[str, list[str]] = defaultdict(list)
        for res in frontier:
            by_type[res.res_type].append(res.res_id)
        added: list[StoredResource] = []
        for rule in active:
            found = _reverse(conn, rule, by_type) if rule.reverse else _forward(conn, rule, by_type)
            if restriction is not None:
                found = _only_visible(conn, found, restriction)
            for res in found:
                if (res.res_type, res.res_id) not in seen and len(included) + len(added) < MAX_INCLUDED:
                    seen.add((res.res_type, res.res_id))
                    added.append(res)
        included.extend(added)
        frontier = added
    return included


_COLUMNS = (_R.c.res_type, _R.c.res_id, _R.c.version_id, _R.c.last_updated, _R.c.content)


def _forward(conn: Connection, rule: Include, by_type: dict[str, list[str]]) -> list[StoredResource]:
    """``_include``: the live resources the given resources refer to through ``rule.param``."""
    found: list[StoredResource] = []
    for source in [rule.source_type] if rule.source_type else sorted(by_type):
        ids = by_type.get(source)
        if not ids:
            continue
        conditions = [_REF.c.res_type == source, _REF.c.res_id.in_(ids), _REF.c.target_id.is_not(None)]
        if rule.param is not None:
            conditions.append(_REF.c.param == rule.param)
        if rule.target_type is not None:
            conditions.append(_REF.c.target_type == rule.target_type)
        targets = select(_REF.c.target_type, _REF.c.target_id).where(*conditions).distinct().subquery()
        query = (
            select(*_COLUMNS)
            .join(targets, and_(_R.c.res_type == targets.c.target_type, _R.c.res_id == targets.c.target_id))
            .where(_R.c.deleted == false())
            .order_by(_R.c.res_type, _R.c.res_id)
            .limit(MAX_INCLUDED)
        )
        found.extend(_stored(row) for row in conn.execute(query))
    return found


def _reverse(conn: Connection, rule: Include, by_type: dict[str, list[str]]) -> list[StoredResource]:
    """``_revinclude``: the live ``rule.source_type`` resources that refer to the given ones."""
    found: list[StoredResource] = []
    assert rule.source_type is not None
    for target_type, ids in sorted(by_type.items()):
        if rule.target_type is not None and rule.target_type != target_type:
            continue
        conditions = [
            _REF.c.res_type == rule.source_type,
            _REF.c.target_type == target_type,
            _REF.c.target_id.in_(ids),
        ]
        if rule.param is not None:
            conditions.append(_REF.c.param == rule.param)
        query = (
            select(*_COLUMNS)
            .where(
                _R.c.res_type == rule.source_type,
                _R.c.deleted == false(),
                _R.c.res_id.in_(select(_REF.c.res_id).where(*conditions)),
            )
            .order_by(_R.c.res_id)
            .limit(MAX_INCLUDED)
        )
        found.extend(_stored(row) for row in conn.execute(query))
    return found
