"""Runs a parsed search (r4/search.py) as SQL over the index tables of store/schema.py.

SQLAlchemy Core only, the same results on SQLite and PostgreSQL. Every filter is an ``IN`` (or, negated, a
``NOT EXISTS``) subquery on one index table narrowed by ``res_type`` and ``param`` first, so the
``ix_<table>_value`` indexes drive it. https://hl7.org/fhir/R4/search.html
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
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
    intersect,
    null,
    or_,
    select,
    true,
    union_all,
)

from iop_fhir.errors import BadRequest
from iop_fhir.r4 import indexing
from iop_fhir.r4 import search as search_rules
from iop_fhir.r4.instants import now_us
from iop_fhir.r4.search import (
    Cursor,
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
# A search known (by its count) to match at most this many resources reads its page from its matches (their ids and
# places from ix_resources_page alone), sorted; a broader one leaves the plan to the database (walking the type in
# order finds a page of common matches at once, but reads the whole type when the matches are its newest rows).
FEW_MATCHES = 10_000
# A chain whose inner search finds at most this many targets names them in the statement (_Query._chain).
CHAIN_TARGETS = 1000
MAX_INCLUDE_ROUNDS = 4  # the first round plus three rounds of :iterate

_R = schema.resources
_H = schema.history
_REF = schema.idx_reference


def run(conn: Connection, request: SearchRequest) -> SearchResult:
    """One page of matches (``_count`` from ``_offset`` or from a next link's ``_cursor``, one more fetched to know
    whether a next page exists), what ``_include``/``_revinclude`` add, and the total unless ``_total=none``:
    counted exactly when asked for (``_total=accurate``, ``_summary=count``, ``_count=0``), else counted up to
    ``r4.search.COUNT_LIMIT`` matches and left out above that."""
    query = _Query(conn.dialect.name == "sqlite", request.restriction, conn)
    r = _R
    where = [r.c.res_type == request.res_type, r.c.deleted == false()]
    # Each filter's ids from the index alone, when it has them (read once: a chain runs its inner search to build
    # them), the bounds of a date range as one set; the other filters are conditions on the resource row.
    found, conditions = query.sets(request.res_type, request.filters)
    # Several such filters meet in one intersection of their ids, computed from the indexes before any resource row
    # is read (a date range: the rows of each bound, tens of thousands, meet in a few).
    if len(found) > 1:
        where.append(r.c.res_id.in_(intersect(*found)))
    else:
        where += [r.c.res_id.in_(m) for m in found]
    where += [query.condition(request.res_type, f, r) for f in conditions]
    if request.compartment:
        where.append(or_(*[query.condition(request.res_type, f, r) for f in request.compartment]))
    if request.restriction is not None:
        where.append(request.restriction.clause(r))
    result = SearchResult()
    exact = request.total == "accurate" or request.summary == "count" or request.count == 0
    if request.wants_total or request.total != "none":
        # Counted before the page: how many match decides how the page is best read (_Pager, ``few``).
        counted = _matches(request, where, found, bool(conditions), query.sqlite)
        result.total = count_matches(conn, counted, None if exact else search_rules.COUNT_LIMIT)
    if request.summary == "count" or request.count == 0:
        return result
    few = result.total is not None and result.total <= FEW_MATCHES
    rows, result.next_cursor = _Pager(conn, request, where, query.sqlite, few=few).page()
    result.has_more = result.next_cursor is not None
    result.matches = [_stored(row) for row in rows]
    if request.includes and result.matches:
        result.included, result.included_cut = _include(conn, request.includes, result.matches, request.restriction)
    return result


def _matches(
    request: SearchRequest, where: list[ColumnElement[bool]], found: list[Select[Any]], conditions: bool, sqlite: bool
) -> Select[Any]:
    """The ids a search's total counts, once each: when every filter has its ids from the index (``found``; no
    ``conditions`` on the resource row) and nothing else narrows it (no restriction, no compartment), from the one
    index its filter reads or the intersection of several, so that counting reads indexes and not every matching
    row; otherwise the matching rows of resources."""
    if not found or conditions or request.restriction is not None or request.compartment:
        return select(_R.c.res_id).where(*where)
    if len(found) > 1:
        return select(intersect(*found).subquery().c.res_id)
    if sqlite:
        # Distinct ids as an expression: else SQLite reads them in the order of the index on res_id, which is
        # every index row of the type, rather than the filter's rows by its value index.
        column = found[0].selected_columns[0]
        return found[0].with_only_columns((column + "").label("res_id")).distinct()
    return found[0].distinct()


def count_matches(conn: Connection, matching: Select[Any], limit: int | None) -> int | None:
    """How many rows ``matching`` selects; with a ``limit``, None when there are more than that (the count stops
    there, so it costs at most ``limit`` rows however many match)."""
    if limit is None:
        return int(conn.execute(select(func.count()).select_from(matching.order_by(None).subquery())).scalar_one())
    capped = matching.order_by(None).limit(limit + 1).subquery()
    found = int(conn.execute(select(func.count()).select_from(capped)).scalar_one())
    return found if found <= limit else None


# -- Part 2 visibility: the condition comes from the request's restriction (privacy/restriction.py) ---------------


def _stored(row: Any) -> StoredResource:
    return StoredResource(row.res_type, row.res_id, row.version_id, row.last_updated, False, bytes(row.content))


# -- filters -------------------------------------------------------------------------------------------------


class _Query:
    """Builds the WHERE clause of each filter; knows the dialect only to add an index-friendly range to
    string prefix matches on SQLite (where LIKE cannot use a BINARY index)."""

    def __init__(self, sqlite: bool, restriction: Visibility | None = None, conn: Connection | None = None) -> None:
        self.sqlite = sqlite
        # A chain's inner search sees what the request may see, at every hop.
        self.restriction = restriction
        self.conn = conn

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
        found = self.matching(res_type, f)
        if found is not None:
            return r.c.res_id.in_(found)
        table = schema.INDEX_TABLES[f.kind]
        scope = select(table.c.res_id).where(table.c.res_type == res_type, table.c.param == f.param)
        if f.missing:
            return ~exists(scope.where(table.c.res_id == r.c.res_id))
        matching = scope.where(or_(*[self._value(f, table, v) for v in f.values]))  # :not
        return ~exists(matching.where(table.c.res_id == r.c.res_id))

    def sets(self, res_type: str, filters: Sequence[Filter]) -> tuple[list[Select[Any]], list[Filter]]:
        """The id sets of ``filters`` that have theirs from the index alone (``matching``; the bounds of a date range
        as one, ``date_range``), and the filters that have none (conditions on the resource row)."""
        found: list[Select[Any]] = []
        conditions: list[Filter] = []
        ranges = _date_ranges(filters)
        for n, f in enumerate(filters):
            bounds = ranges.get(n)
            if bounds is not None:
                if bounds:  # the range's first bound stands for all of them
                    found.append(self.date_range(res_type, bounds))
                continue
            matched = self.matching(res_type, f)
            if matched is None:
                conditions.append(f)
            else:
                found.append(matched)
        return found, conditions

    def date_range(self, res_type: str, bounds: Sequence[Filter]) -> Select[Any]:
        """The ids of the resources satisfying every one of ``bounds`` (one date parameter's, at least one lower and
        one upper): a row satisfying them all, found where it starts (it starts at most SHORT_DATE before the
        highest lower bound, or is a long row); and a resource with several rows whose bounds each hold on one."""
        t = schema.idx_date
        scope = (t.c.res_type == res_type, t.c.param == bounds[0].param)
        values = [_only_date(f) for f in bounds]
        every = [_date(v, t.c.low, t.c.high) for v in values]
        starts = max(v.low for v in values if v.prefix in _LOWER) - schema.SHORT_DATE
        short = select(t.c.res_id).where(*scope, t.c.low >= starts, *every)
        long = select(t.c.res_id).where(*scope, schema.long_date(t), *every)
        other = t.alias("other")
        each = [
            exists().where(
                other.c.res_type == res_type,
                other.c.res_id == t.c.res_id,
                other.c.param == bounds[0].param,
                _date(v, other.c.low, other.c.high),
            )
            for v in values
        ]
        several = select(t.c.res_id).where(*scope, schema.one_of_several(t), *each)
        return select(union_all(short, long, several).subquery().c.res_id)

    def matching(self, res_type: str, f: Filter) -> Select[Any] | None:
        """The ids of the live resources satisfying ``f``, read from the index alone, when ``f`` is such a filter
        (a value, a chain, ``:missing=false``; None for ``_id``, ``_lastUpdated``, ``:missing=true`` and ``:not``).
        An id may come more than once. Index rows are kept for current, live versions only (store/sql.py drops a
        resource's rows when it is updated or deleted)."""
        if f.param in ("_id", "_lastUpdated") or f.missing is True or f.modifier == "not":
            return None
        table = schema.INDEX_TABLES[f.kind]
        scope = select(table.c.res_id).where(table.c.res_type == res_type, table.c.param == f.param)
        if f.missing is False:
            return scope
        if f.chain is not None:
            return self._chain(res_type, f)
        return scope.where(or_(*[self._value(f, table, v) for v in f.values]))

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
        found: Any = targets
        if self.conn is not None:
            # The targets found first, named in the statement: the planner then knows how many resources refer to
            # them (per-value statistics of idx_reference), where for a subquery it guesses one row, and takes the
            # plan of a rare match for a chain that matches a quarter of the type.
            ids = [row[0] for row in self.conn.execute(targets.limit(CHAIN_TARGETS + 1))]
            if len(ids) <= CHAIN_TARGETS:
                found = ids
        return select(_REF.c.res_id).where(
            _REF.c.res_type == res_type,
            _REF.c.param == f.param,
            _REF.c.target_type == f.target_type,
            _REF.c.target_id.in_(found),
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


_LOWER = frozenset({"gt", "ge", "sa"})  # a date prefix that bounds from below
_UPPER = frozenset({"lt", "le", "eb"})


def _only_date(f: Filter) -> DateValue:
    [value] = f.values
    assert isinstance(value, DateValue)
    return value


def _date_ranges(filters: Sequence[Filter]) -> dict[int, list[Filter]]:
    """The date ranges among ``filters``: for each date parameter bounded from below and from above by filters of one
    value each (no modifier), its bounds, by the position of each bound; the first bound maps to them all, the others
    to an empty list."""
    by_param: dict[str, list[int]] = defaultdict(list)
    for n, f in enumerate(filters):
        if (
            f.kind == "date"
            and f.param != "_lastUpdated"
            and f.modifier is None
            and f.missing is None
            and f.chain is None
            and len(f.values) == 1
            and isinstance(f.values[0], DateValue)
            and f.values[0].prefix in _LOWER | _UPPER
        ):
            by_param[f.param].append(n)
    ranges: dict[int, list[Filter]] = {}
    for positions in by_param.values():
        prefixes = {_only_date(filters[n]).prefix for n in positions}
        if prefixes & _LOWER and prefixes & _UPPER:
            ranges[positions[0]] = [filters[n] for n in positions]
            ranges.update((n, []) for n in positions[1:])
    return ranges


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


# -- order and paging ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SortKey:
    """One ORDER BY key: its value expression, its direction, and whether it can be missing (then it sorts last)."""

    value: Any
    descending: bool
    nullable: bool

    def order(self) -> Any:
        if not self.nullable:
            return self.value.desc() if self.descending else self.value.asc()
        return self.value.desc().nulls_last() if self.descending else self.value.asc().nulls_last()

    def python(self, value: Any) -> tuple[Any, ...]:
        """The Python sort key of ``value`` under this key's order (missing last; descending by negation or, for
        text, by the reversed order of its code points)."""
        if value is None:
            return (1,)
        if not self.descending:
            return (0, value)
        if isinstance(value, str):
            return (0, tuple(-ord(c) for c in value) + (1,))
        return (0, -value)


class _Pager:
    """Reads one page of a search in its order, from an ``_offset`` or from a next link's cursor.

    The order is the ``_sort`` keys, each from the one index row flagged as holding the resource's sort value
    (store/schema.py SORT_VALUES), missing values last, then res_id; by default last_updated then res_id (oldest
    first). A sort by a param reads first the resources that have a value, walking the param's partial sort index in
    order (a bounded top-N), then those that have none, by their other keys and res_id.

    Paging by cursor is stable under writes: the first page's time is the paging's snapshot, and every later page
    holds the entries of the search as it stood at that time, in that order. A resource written since the snapshot
    keeps the place its version current at the snapshot had (its last_updated, or the sort values that version's
    index rows would have), so it is served exactly once, as it is now; one created since, or deleted or no longer
    matching, is not served. Each page continues strictly after the keys and id of the last entry served. ``_offset``
    pages count from the start of the current results and promise nothing under writes.
    """

    def __init__(
        self,
        conn: Connection,
        request: SearchRequest,
        where: list[Any],
        sqlite: bool,
        *,
        few: bool = False,
    ) -> None:
        self.conn = conn

        # Known to match at most FEW_MATCHES resources: then reading the matches and sorting them is cheap, where
        # walking the whole type in order and testing each could read every row before finding a page of rare ones.
        self.few = few
        self.request = request
        self.where = where
        self.sqlite = sqlite
        self.cursor = request.cursor
        self.snapshot = self.cursor.snapshot if self.cursor is not None else now_us()
        self.wanted = request.count + 1  # one more than a page: whether a next page exists
        if self.cursor is not None and not _fits(self.cursor, request.sort):
            raise BadRequest("_cursor: not a page cursor of this search", "_cursor")

    def page(self) -> tuple[list[Any], Cursor | None]:
        """The rows of the page (res_type, res_id, version_id, last_updated, content, then the keys k0, k1...)
        and the cursor of the next page (None on the last)."""
        sort = self.request.sort
        if not sort or sort[0].param in ("_id", "_lastUpdated"):
            keys = self._keys(_R, sort) if sort else [_SortKey(_R.c.last_updated, False, False)]
            statement = select(*_COLUMNS, *_labels(keys)).where(*self.where)
            found = self._unchanged(statement, keys, missing=False, light=True)
            found = self._merge(found, self._changed(keys, missing=False), keys)
            return self._finish(found, keys, lambda row: False)
        first = sort[0]
        table = schema.INDEX_TABLES[first.kind]
        s = table.alias("s0")
        value = s.c[schema.SORT_VALUES[table.name][1 if first.descending else 0]]
        flag = (s.c.sort_desc if first.descending else s.c.sort_asc) == true()  # the partial index's own term
        rest = self._keys(_R, sort[1:])
        keys = [_SortKey(value, first.descending, False), *rest]
        rows: list[Any] = []
        valued = (
            select(*_COLUMNS, *_labels(keys))
            .select_from(s.join(_R, and_(_R.c.res_type == s.c.res_type, _R.c.res_id == s.c.res_id)))
            .where(s.c.res_type == self.request.res_type, s.c.param == first.param, flag, *self.where)
        )
        if self.cursor is None or not self.cursor.missing:
            # s0.res_id rather than resources.res_id: the same value, and the index's own last column.
            rows = self._unchanged(valued, keys, missing=False, res_id=s.c.res_id)
            rows = self._merge(rows, self._changed(keys, missing=False), keys)
        if len(rows) < self.wanted:
            missing_offset = 0
            if self.request.offset:  # where the missing ones start, for an _offset page
                valued_total = self.request.offset + len(rows)
                if not rows:
                    valued_total = self.conn.execute(
                        valued.with_only_columns(func.count()).order_by(None).where(_R.c.last_updated <= self.snapshot)
                    ).scalar_one()
                missing_offset = max(0, self.request.offset - valued_total)
            marked = select(s.c.res_id).where(
                s.c.res_type == _R.c.res_type, s.c.res_id == _R.c.res_id, s.c.param == first.param, flag
            )
            none_keys = [_SortKey(null(), first.descending, True), *rest]
            missing = select(*_COLUMNS, *_labels(none_keys)).where(*self.where, ~exists(marked))
            more = self._unchanged(missing, rest, missing=True, limit=self.wanted - len(rows), offset=missing_offset)
            more = self._merge(more, self._changed(none_keys, missing=True), none_keys)
            rows = [*rows, *more][: self.wanted]
        return self._finish(rows, keys, lambda row: row.k0 is None)

    def _keys(self, r: FromClause, sort: Sequence[SortKey]) -> list[_SortKey]:
        keys = []
        for key in sort:
            if key.param in ("_id", "_lastUpdated"):
                column = r.c.res_id if key.param == "_id" else r.c.last_updated
                keys.append(_SortKey(column, key.descending, False))
                continue
            table = schema.INDEX_TABLES[key.kind]
            value_name = schema.SORT_VALUES[table.name][1 if key.descending else 0]
            flag_name = "sort_desc" if key.descending else "sort_asc"
            value = (
                select(table.c[value_name])
                .where(
                    table.c.res_type == r.c.res_type,
                    table.c.res_id == r.c.res_id,
                    table.c.param == key.param,
                    table.c[flag_name] == true(),
                )
                .scalar_subquery()
            )
            keys.append(_SortKey(value, key.descending, True))
        return keys

    def _unchanged(
        self,
        statement: Select[Any],
        keys: list[_SortKey],
        *,
        missing: bool,
        res_id: Any = None,
        limit: int | None = None,
        offset: int | None = None,
        light: bool = False,
    ) -> list[Any]:
        """The rows of ``statement`` last written at or before the snapshot, after the cursor, in order. ``light``
        (keys of resources' own columns only): the page is chosen on ids and keys alone, which
        ix_resources_page holds, and only its rows are read whole; choosing it among thousands of matches then
        reads no resource's row but theirs."""
        res_id = _R.c.res_id if res_id is None else res_id
        written: Any = _R.c.last_updated
        if self.sqlite and self.request.sort:
            # Unindexable: else SQLite's planner walks the resources by last_updated rather than the sort index.
            written = written + 0
        statement = statement.where(written <= self.snapshot)
        if self.cursor is not None and self.cursor.missing == missing:
            statement = statement.where(
                *_after(keys, self.cursor.keys[len(self.cursor.keys) - len(keys) :], res_id, self.cursor.res_id)
            )
        order = [key.order() for key in keys]
        narrowed = bool(self.request.filters or self.request.compartment or self.request.restriction)
        if not self.request.sort and narrowed and (self.few or (self.sqlite and self.request.filters)):
            # Walking the type's resources by last_updated and testing each reads the whole type when the matches
            # are rare: PostgreSQL chooses it when it misjudges how many match (filters on several index tables),
            # SQLite without statistics always. "+ 0" makes the sort key unindexable, so the filters drive the query
            # and only their matches are sorted: on PostgreSQL when they are known to be few (counted first), on
            # SQLite whenever there are filters.
            order = [(_R.c.last_updated + 0).asc()]
        statement = statement.order_by(*order, res_id.asc()).limit(self.wanted if limit is None else limit)
        if offset is None:
            offset = self.request.offset
        if offset:
            statement = statement.offset(offset)
        if light:
            names = [f"k{i}" for i in range(len(keys))]
            chosen = [c for c in statement.selected_columns if c.name in names]
            top = statement.with_only_columns(res_id.label("top_id"), *chosen).subquery("top")
            ordered = [
                _SortKey(top.c[name], key.descending, key.nullable).order()
                for name, key in zip(names, keys, strict=True)
            ]
            statement = (
                select(*_COLUMNS, *[top.c[name] for name in names])
                .select_from(top.join(_R, and_(_R.c.res_type == self.request.res_type, _R.c.res_id == top.c.top_id)))
                .order_by(*ordered, top.c.top_id.asc())
            )
        return list(self.conn.execute(statement).all())

    def _changed(self, keys: list[_SortKey], *, missing: bool) -> list[Any]:
        """The matches written since the snapshot that existed then, with the keys of their version current at the
        snapshot, after the cursor (none on a first page, whose snapshot is now)."""
        if self.cursor is None:
            return []
        since = select(_R.c.res_id, _R.c.version_id).where(*self.where, _R.c.last_updated > self.snapshot)
        changed = {row.res_id: row.version_id for row in self.conn.execute(since)}
        if not changed:
            return []
        then = (
            select(_H.c.res_id, _H.c.version_id, _H.c.last_updated, _H.c.content)
            .where(_H.c.res_type == self.request.res_type, _H.c.res_id.in_(list(changed)))
            .where(_H.c.last_updated <= self.snapshot)
            .order_by(_H.c.res_id, _H.c.version_id)
        )
        at_snapshot: dict[str, Any] = {}
        for row in self.conn.execute(then):
            at_snapshot[row.res_id] = row  # the last one at or before the snapshot
        found = []
        current = {
            row.res_id: row
            for row in self.conn.execute(
                select(*_COLUMNS).where(_R.c.res_type == self.request.res_type, _R.c.res_id.in_(list(at_snapshot)))
            )
        }
        for res_id, old in at_snapshot.items():
            if old.content is None or res_id not in current:
                continue  # deleted at the snapshot
            values = self._snapshot_keys(old)
            if (values[0] is None) != missing:
                continue
            found.append(_Row(*current[res_id], *values))
        position = self.cursor.keys if self.cursor.missing == missing else None
        chosen = [
            row
            for row in found
            if position is None
            or _py_key(keys, row) > _py_key(keys, _Row("", self.cursor.res_id, 0, 0, b"", *position))
        ]
        return sorted(chosen, key=lambda row: _py_key(keys, row))

    def _snapshot_keys(self, old: Any) -> list[Any]:
        """The sort keys of a version as it was stored: its last_updated, or its sort values."""
        sort = self.request.sort
        if not sort:
            return [old.last_updated]
        resource = orjson.loads(bytes(old.content))
        rows = indexing.extract(resource)
        values: list[Any] = []
        for key in sort:
            if key.param == "_id":
                values.append(resource.get("id"))
                continue
            if key.param == "_lastUpdated":
                values.append(old.last_updated)
                continue
            flag = "sort_desc" if key.descending else "sort_asc"
            column = schema.SORT_VALUES[schema.INDEX_TABLES[key.kind].name][1 if key.descending else 0]
            marked = [
                row[column]
                for row in indexing.mark_sort_rows(key.kind, rows.get(key.kind, []))
                if row["param"] == key.param and row[flag]
            ]
            values.append(marked[0] if marked else None)
        return values

    def _merge(self, unchanged: list[Any], changed: list[Any], keys: list[_SortKey]) -> list[Any]:
        if not changed:
            return unchanged
        return sorted([*unchanged, *changed], key=lambda row: _py_key(keys, row))[: self.wanted]

    def _finish(
        self, rows: list[Any], keys: list[_SortKey], is_missing: Callable[[Any], bool]
    ) -> tuple[list[Any], Cursor | None]:
        if len(rows) <= self.request.count:
            return rows, None
        rows = rows[: self.request.count]
        last = rows[-1]
        values = tuple(getattr(last, f"k{i}") for i in range(len(keys)))
        return rows, Cursor(self.snapshot, is_missing(last), values, last.res_id)


# The Python type of each kind's sort value in a cursor (JSON gives an integral float back as an int).
_CURSOR_TYPES: dict[str, tuple[type, ...]] = {
    "token": (str,),
    "string": (str,),
    "reference": (str,),
    "uri": (str,),
    "date": (int,),
    "number": (int, float),
    "quantity": (int, float),
}


def _fits(cursor: Cursor, sort: Sequence[SortKey]) -> bool:
    """Whether ``cursor`` has the keys of a search sorted by ``sort`` (by default: last_updated, an int)."""
    if not sort:
        return len(cursor.keys) == 1 and type(cursor.keys[0]) is int
    if len(cursor.keys) != len(sort) or (cursor.missing and cursor.keys[0] is not None):
        return False
    for key, value in zip(sort, cursor.keys, strict=True):
        wanted = (str,) if key.param == "_id" else (int,) if key.param == "_lastUpdated" else _CURSOR_TYPES[key.kind]
        if not (isinstance(value, wanted) or (value is None and key.param not in ("_id", "_lastUpdated"))):
            return False
    return True


def _labels(keys: list[_SortKey]) -> list[Any]:
    return [key.value.label(f"k{i}") for i, key in enumerate(keys)]


class _Row:
    """A page row built in Python (a resource written since the snapshot, with its keys at the snapshot)."""

    def __init__(self, res_type: str, res_id: str, version_id: int, last_updated: int, content: Any, *keys: Any):
        self.res_type, self.res_id, self.version_id, self.last_updated, self.content = (
            res_type,
            res_id,
            version_id,
            last_updated,
            content,
        )
        for i, value in enumerate(keys):
            setattr(self, f"k{i}", value)


def _py_key(keys: list[_SortKey], row: Any) -> tuple[Any, ...]:
    return (*(key.python(getattr(row, f"k{i}")) for i, key in enumerate(keys)), row.res_id)


def _after(keys: list[_SortKey], values: Sequence[Any], res_id: Any, last_id: str) -> list[Any]:
    """The keyset condition: the row comes after (``values``, ``last_id``) in the order of ``keys`` then res_id
    (missing values last). A bound on the first key, implied, lets an index range start at the cursor."""
    later: Any = res_id > last_id
    for key, value in reversed(list(zip(keys, values, strict=True))):
        if value is None:  # only missing values come after a missing one: they tie
            later = and_(key.value.is_(None), later)
            continue
        beyond = key.value < value if key.descending else key.value > value
        if key.nullable:
            beyond = or_(beyond, key.value.is_(None))
        later = or_(beyond, and_(key.value == value, later))
    conditions = [later]
    if keys and values and values[0] is not None and not keys[0].nullable:
        conditions.append(keys[0].value <= values[0] if keys[0].descending else keys[0].value >= values[0])
    return conditions


# -- _include / _revinclude ----------------------------------------------------------------------------------


def _include(
    conn: Connection, rules: Sequence[Include], matches: list[StoredResource], restriction: Visibility | None
) -> tuple[list[StoredResource], bool]:
    """Apply every rule to the matches, then the ``:iterate`` rules to what the previous round added, until
    nothing new comes or a bound is reached; nothing is returned twice, nor a match again
    (https://hl7.org/fhir/R4/search.html#include). Under a restriction each rule reads only what may be seen, so
    that no round iterates from a hidden resource. Also whether the bound (r4/search.py MAX_INCLUDED) left out
    resources a rule found (the first ones by type and id are kept); under a restriction only visible ones count,
    so that the answer tells nothing of hidden ones."""
    seen = {(m.res_type, m.res_id) for m in matches}
    included: list[StoredResource] = []
    frontier = matches
    cut = False
    for round_ in range(MAX_INCLUDE_ROUNDS):
        active = [rule for rule in rules if round_ == 0 or rule.iterate]
        if not active or not frontier:
            break
        by_type: dict[str, list[str]] = defaultdict(list)
        for res in frontier:
            by_type[res.res_type].append(res.res_id)
        added: list[StoredResource] = []
        for rule in active:
            follow = _reverse if rule.reverse else _forward
            found, more = follow(conn, rule, by_type, restriction)
            cut |= more
            for res in found:
                if (res.res_type, res.res_id) in seen:
                    continue
                if len(included) + len(added) >= search_rules.MAX_INCLUDED:
                    cut = True
                    break
                seen.add((res.res_type, res.res_id))
                added.append(res)
        included.extend(added)
        frontier = added
    return included, cut


_COLUMNS = (_R.c.res_type, _R.c.res_id, _R.c.version_id, _R.c.last_updated, _R.c.content)


def _visible(restriction: Visibility | None) -> list[ColumnElement[bool]]:
    return [] if restriction is None else [restriction.clause(_R)]


def _bounded(conn: Connection, query: Select[Any]) -> tuple[list[StoredResource], bool]:
    """The rows of ``query`` (which asks for one more than MAX_INCLUDED), at most MAX_INCLUDED of them, and
    whether there were more."""
    rows = [_stored(row) for row in conn.execute(query)]
    return rows[: search_rules.MAX_INCLUDED], len(rows) > search_rules.MAX_INCLUDED


def _forward(
    conn: Connection, rule: Include, by_type: dict[str, list[str]], restriction: Visibility | None
) -> tuple[list[StoredResource], bool]:
    """``_include``: the live resources the given resources refer to through ``rule.param`` (that ``restriction``
    lets be seen)."""
    found: list[StoredResource] = []
    more = False
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
            .where(_R.c.deleted == false(), *_visible(restriction))
            .order_by(_R.c.res_type, _R.c.res_id)
            .limit(search_rules.MAX_INCLUDED + 1)
        )
        rows, cut = _bounded(conn, query)
        found.extend(rows)
        more |= cut
    return found, more


def _reverse(
    conn: Connection, rule: Include, by_type: dict[str, list[str]], restriction: Visibility | None
) -> tuple[list[StoredResource], bool]:
    """``_revinclude``: the live ``rule.source_type`` resources that refer to the given ones (that ``restriction``
    lets be seen). Unrestricted, their ids are bounded in the index before any row is read: only a live resource
    has search index rows (a deletion drops them), so the first MAX_INCLUDED ids there are the first live ones,
    and a patient's thousands of Observations cost the reading of a thousand. Restricted, the bound counts only
    the rows that may be seen."""
    found: list[StoredResource] = []
    more = False
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
        referring = select(_REF.c.res_id).where(*conditions).distinct()
        if restriction is None:  # every indexed id is a live resource's: the bound can be taken here
            referring = referring.order_by(_REF.c.res_id).limit(search_rules.MAX_INCLUDED + 1)
        first = referring.subquery()
        query = (
            select(*_COLUMNS)
            .join(first, _R.c.res_id == first.c.res_id)
            .where(_R.c.res_type == rule.source_type, _R.c.deleted == false(), *_visible(restriction))
            .order_by(_R.c.res_id)
            .limit(search_rules.MAX_INCLUDED + 1)
        )
        rows, cut = _bounded(conn, query)
        found.extend(rows)
        more |= cut
    return found, more
