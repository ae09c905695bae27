"""The query shapes that once scanned a whole resource type are planned to use an index, on SQLite and PostgreSQL:
a sorted page walks the partial sort index of the first ``_sort`` key in order (no sort of the type's rows), alone,
under a partner's restriction and when continued by a cursor. Asserted on the databases' own EXPLAIN of the statement
store/search_sql.py runs, after ANALYZE, on a database migrated by migrations/, not by timing."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, event, insert, text

from iop_fhir.privacy.restriction import Restriction
from iop_fhir.privacy.visibility import facts_of
from iop_fhir.r4 import indexing
from iop_fhir.r4.search import SearchRequest, parse
from iop_fhir.store import migrate, schema
from iop_fhir.store.base import HistoryCursor, SearchResult
from iop_fhir.store.search_sql import run
from iop_fhir.store.sql import history_statements
from tests.store.scratch import scratch_engine

OBSERVATIONS = 3000
PATIENTS = 3000
T0 = 1_700_000_000_000_000
CODES = [f"{1000 + n}-{n % 10}" for n in range(40)]


def _patient(n: int) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": f"p{n}", "name": [{"family": f"Family{(n * 7919) % 997:04d}"}]}


def _observation(n: int) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"o{n}",
        "status": "final" if n % 4 else "amended",
        "code": {"coding": [{"system": "http://loinc.org", "code": CODES[(n * 31) % len(CODES)]}]},
        "subject": {"reference": f"Patient/p{(n * 13) % PATIENTS}"},
        "effectiveDateTime": f"20{10 + n % 15}-{1 + n % 12:02d}-{1 + n % 28:02d}",
        "valueQuantity": {"value": (n * 37) % 500, "unit": "{score}"},
    }


def _load(engine: Engine) -> None:
    resources: list[dict[str, Any]] = []
    index: dict[str, list[dict[str, Any]]] = {kind: [] for kind in schema.INDEX_TABLES}
    everything = [_patient(n) for n in range(PATIENTS)] + [_observation(n) for n in range(OBSERVATIONS)]
    for n, resource in enumerate(everything):
        key = {"res_type": resource["resourceType"], "res_id": resource["id"]}
        extracted = indexing.extract(resource)
        facts = facts_of(resource, extracted)
        visibility = {"owner": facts.owner, "protected": facts.protected, "note": facts.note}
        resources.append({**key, "version_id": 1, "last_updated": T0 + n, "deleted": False, **visibility})
        resources[-1]["content"] = orjson.dumps(resource)
        for kind, rows in extracted.items():
            index[kind] += [{**key, **row} for row in indexing.mark_sort_rows(kind, rows)]
    history = [
        {**{k: r[k] for k in ("res_type", "res_id", "version_id", "last_updated", "content")}, "method": "PUT"}
        for r in resources
    ]
    with engine.begin() as conn:
        conn.execute(insert(schema.resources), resources)
        conn.execute(insert(schema.history), history)
        for kind, rows in index.items():
            if rows:
                conn.execute(insert(schema.INDEX_TABLES[kind]), rows)
        # only this schema's tables: others are in use
        for table in (schema.resources, schema.history, *schema.INDEX_TABLES.values()):
            conn.execute(text(f"ANALYZE {table.name}"))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A migrated database per backend holding 3,000 Observations and 3,000 Patients, analyzed (read-only in tests)."""

    def prepare(engine: Engine) -> None:
        migrate.upgrade(engine)
        _load(engine)

    with scratch_engine(request.param, tmp_path_factory, "plans", prepare) as engine:
        yield engine


def _run(engine: Engine, request: SearchRequest) -> tuple[SearchResult, list[tuple[str, Any]]]:
    """What the search found, and the statements it sent (with their parameters)."""
    statements: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with engine.connect() as conn:
            result = run(conn, request)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return result, statements


def _planned(engine: Engine, request: SearchRequest, counting: bool = False) -> tuple[SearchResult, str]:
    """What the search found, and the plan of the statement that read its page (the one with a LIMIT) or, when
    ``counting``, that counted its total, as text."""
    result, statements = _run(engine, request)
    counts = [s.startswith("SELECT count(") for s, _ in statements]
    if counting:
        chosen = [(s, p) for (s, p), count in zip(statements, counts, strict=True) if count]
    else:
        chosen = [(s, p) for (s, p), count in zip(statements, counts, strict=True) if "LIMIT" in s and not count]
    assert len(chosen) == 1, [s for s, _ in statements]
    statement, parameters = chosen[0]
    explain = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
    if counting and engine.dialect.name != "sqlite":
        # An index-only scan needs the table's visibility map, which VACUUM (autovacuum in production) keeps.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE resources")
    with engine.connect() as conn:
        if counting and engine.dialect.name != "sqlite":
            # 6,000 rows fit in a few pages, where reading the table is cheaper than any index; at scale (a wide
            # table of content) it is not. What is asserted is that the count CAN be answered from an index alone.
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        plan = conn.exec_driver_sql(explain + statement, parameters).all()
    return result, "\n".join(str(row[-1]) for row in plan)


def _page_plan(engine: Engine, request: SearchRequest) -> tuple[list[str], str]:
    """The ids of the page, and the plan of the statement that read it."""
    result, plan = _planned(engine, request)
    return [m.res_id for m in result.matches], plan


def _request(res_type: str, query: str, **changes: Any) -> SearchRequest:
    params = [(k, v) for k, _, v in (pair.partition("=") for pair in query.split("&"))]
    return dataclasses.replace(parse(res_type, params), total="none", **changes)


SORTS = [
    ("Observation", "code", "ix_idx_token_sort_asc", lambda r: r["code"]["coding"][0]["code"], False),
    ("Observation", "-code", "ix_idx_token_sort_desc", lambda r: r["code"]["coding"][0]["code"], True),
    ("Observation", "-date", "ix_idx_date_sort_desc", lambda r: indexing.date_range(r["effectiveDateTime"])[1], True),
    ("Observation", "subject", "ix_idx_reference_sort_asc", lambda r: r["subject"]["reference"][8:], False),
    ("Observation", "-value-quantity", "ix_idx_quantity_sort_desc", lambda r: r["valueQuantity"]["value"], True),
    ("Patient", "family", "ix_idx_string_sort_asc", lambda r: r["name"][0]["family"].lower(), False),
]


def _assert_walks_index(plan: str, index: str, sqlite: bool) -> None:
    assert index in plan, plan
    if sqlite:
        assert "TEMP B-TREE FOR ORDER BY" not in plan, plan
    else:
        assert "Sort Key" not in plan and "Seq Scan" not in plan, plan


def _all(res_type: str) -> list[dict[str, Any]]:
    if res_type == "Patient":
        return [_patient(n) for n in range(PATIENTS)]
    return [_observation(n) for n in range(OBSERVATIONS)]


def _in_order(res_type: str, key: Any, descending: bool, only: Any = None) -> list[str]:
    """The ids in sort order, ties by ascending id in both directions."""
    resources = [r for r in _all(res_type) if only is None or only(r)]
    resources.sort(key=lambda r: r["id"])
    if descending:  # a stable sort by the rank of the reversed value keeps ascending ids within a tie
        rank = {value: -i for i, value in enumerate(sorted({key(r) for r in resources}))}
        resources.sort(key=lambda r: rank[key(r)])
    else:
        resources.sort(key=key)
    return [r["id"] for r in resources]


@pytest.mark.parametrize(("res_type", "sort", "index", "key", "descending"), SORTS)
def test_a_sorted_page_walks_the_sort_index_in_order(
    engine: Engine, res_type: str, sort: str, index: str, key: Any, descending: bool
) -> None:
    found, plan = _page_plan(engine, _request(res_type, f"_sort={sort}&_count=10"))
    assert found == _in_order(res_type, key, descending)[:10]
    _assert_walks_index(plan, index, engine.dialect.name == "sqlite")


@pytest.mark.parametrize(("res_type", "sort", "index", "key", "descending"), SORTS)
def test_the_next_page_by_cursor_walks_the_sort_index_from_the_cursor(
    engine: Engine, res_type: str, sort: str, index: str, key: Any, descending: bool
) -> None:
    with engine.connect() as conn:
        first = run(conn, _request(res_type, f"_sort={sort}&_count=25"))
    assert first.next_cursor is not None
    found, plan = _page_plan(engine, _request(res_type, f"_sort={sort}&_count=10", cursor=first.next_cursor))
    assert found == _in_order(res_type, key, descending)[25:35]
    _assert_walks_index(plan, index, engine.dialect.name == "sqlite")


def test_a_sorted_page_under_a_partner_restriction_walks_the_sort_index(engine: Engine) -> None:
    allowed = frozenset(f"p{n}" for n in range(0, PATIENTS, 3))
    request = _request("Observation", "_sort=-date&_count=10", restriction=Restriction(allowed))
    found, plan = _page_plan(engine, request)
    date_key = SORTS[2][3]
    visible = _in_order("Observation", date_key, True, only=lambda r: r["subject"]["reference"][8:] in allowed)
    assert found == visible[:10]
    _assert_walks_index(plan, "ix_idx_date_sort_desc", engine.dialect.name == "sqlite")


def test_a_partners_total_is_counted_from_the_owner_index_with_no_lookup_in_the_search_index_per_row(
    engine: Engine,
) -> None:
    allowed = frozenset(f"p{n}" for n in range(0, PATIENTS, 3))
    request = dataclasses.replace(
        parse("Observation", [("_summary", "count")]), total="accurate", restriction=Restriction(allowed)
    )
    result, plan = _planned(engine, request, counting=True)
    assert result.total == len([o for o in _all("Observation") if o["subject"]["reference"][8:] in allowed])
    assert "ix_resources_owner" in plan, plan
    assert "idx_reference" not in plan and "idx_token" not in plan, plan
    if engine.dialect.name != "sqlite":
        assert "Seq Scan" not in plan, plan


def test_a_partners_unsorted_page_reads_no_search_index_per_row(engine: Engine) -> None:
    allowed = frozenset(f"p{n}" for n in range(0, PATIENTS, 3))
    found, plan = _page_plan(engine, _request("Observation", "_count=10", restriction=Restriction(allowed)))
    in_order = sorted(_all("Observation"), key=lambda r: int(r["id"][1:]))  # by lastUpdated: loaded in id order
    assert found == [o["id"] for o in in_order if o["subject"]["reference"][8:] in allowed][:10]
    assert "idx_reference" not in plan and "idx_token" not in plan, plan


def test_the_total_of_a_whole_type_is_counted_from_an_index_alone(engine: Engine) -> None:
    request = dataclasses.replace(parse("Observation", [("_summary", "count")]), total="accurate")
    result, plan = _planned(engine, request, counting=True)
    assert result.total == OBSERVATIONS
    assert "ix_resources_live" in plan or "ix_resources_owner" in plan, plan  # both hold (res_type, deleted)
    if engine.dialect.name == "sqlite":
        assert "COVERING INDEX" in plan, plan
    else:
        assert "Index Only Scan" in plan and "Seq Scan" not in plan, plan


@pytest.mark.parametrize("res_type", ["Observation", None])
def test_a_history_page_after_a_cursor_walks_the_history_index_from_the_cursor(
    engine: Engine, res_type: str | None
) -> None:
    """The page half way into the history that a next link leads to: no sort of the history, no offset."""
    deep = (OBSERVATIONS + (PATIENTS if res_type is None else 0)) // 2
    last = T0 + PATIENTS + OBSERVATIONS - 1 - deep  # loaded one microsecond apart, in order
    kind = "Observation" if res_type is not None or last >= T0 + PATIENTS else "Patient"
    number = last - T0 - (PATIENTS if kind == "Observation" else 0)
    after = HistoryCursor(T0 + 10**9, deep, last, 1, kind, f"{'o' if kind == 'Observation' else 'p'}{number}")
    _, query = history_statements(res_type, None, since=None, at=None, count=10, offset=0, after=after)
    with engine.connect() as conn:
        found = [row.last_updated for row in conn.execute(query)]
        statement = str(query.compile(conn, compile_kwargs={"literal_binds": True}))
        explain = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
        plan = "\n".join(str(row[-1]) for row in conn.exec_driver_sql(explain + statement))
    assert found == [last - n for n in range(1, 11)]
    assert "ix_history_type_updated" in plan or "ix_history_updated" in plan, plan
    if engine.dialect.name == "sqlite":
        assert "TEMP B-TREE FOR ORDER BY" not in plan, plan
    else:  # in last_updated order from the cursor: at most the entries of one instant are sorted among themselves
        assert "Seq Scan" not in plan and ("Sort Key" not in plan or "Presorted Key: last_updated" in plan), plan


def test_a_date_range_is_read_from_where_its_rows_start_in_one_range_of_the_date_index(engine: Engine) -> None:
    # Both bounds on one parameter: the rows that start from a week before the range to its end, one range of
    # ix_idx_date_value, not two sets of every row before and after it, intersected.
    params = [("date", "ge2015-03-01"), ("date", "lt2015-05-01"), ("_summary", "count")]
    result, plan = _planned(engine, dataclasses.replace(parse("Observation", params), total="accurate"), counting=True)
    expected = [o["id"] for o in _all("Observation") if "2015-03-01" <= o["effectiveDateTime"] < "2015-05-01"]
    assert result.total == len(expected) > 0
    assert "INTERSECT" not in plan.upper() and "HashSetOp" not in plan, plan
    if engine.dialect.name == "sqlite":
        assert "ix_idx_date_value (res_type=? AND param=? AND low>? AND low<?)" in plan, plan
    else:
        assert re.search(r"ix_idx_date_value.*\n.*Index Cond: .*low >= .*low < ", plan), plan


def test_a_revinclude_bounds_the_ids_it_reads_in_the_search_index_before_reading_any_resource(engine: Engine) -> None:
    # A patient's thousands of Observations: only the first MAX_INCLUDED (+1) ids are taken from the index, in order,
    # and only their rows are read; not every referring row read and sorted to keep a thousand.
    result, statements = _run(engine, _request("Patient", "_id=p13&_revinclude=Observation:subject"))
    assert [m.res_id for m in result.matches] == ["p13"]
    assert [(r.res_type, r.res_id) for r in result.included] == [("Observation", "o1")]  # the one with subject p13
    [(statement, parameters)] = [(s, p) for s, p in statements if "idx_reference" in s]
    explain = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
    with engine.connect() as conn:
        plan = "\n".join(str(row[-1]) for row in conn.exec_driver_sql(explain + statement, parameters).all())
    assert "ix_idx_reference_value" in plan, plan
    if engine.dialect.name == "sqlite":
        assert re.search(r"CO-ROUTINE|MATERIALIZE", plan), plan  # the bounded ids, as a subquery of their own
    else:
        # the LIMIT sits on the index's ids, below the join that reads resources
        limit = plan.index("Limit")
        assert plan.index("ix_idx_reference_value") > limit and "Sort Key: resources" not in plan, plan
