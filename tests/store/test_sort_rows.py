"""The index row that holds a resource's sort value for a param is flagged (sort_asc: the lowest ascending value,
sort_desc: the highest descending one), by the store on every write (r4/indexing.py mark_sort_rows) and by migration
0011 for rows written before it, identically."""

from __future__ import annotations

from typing import Any

from sqlalchemy import column, create_engine, insert, select, table

from iop_fhir.r4 import indexing
from iop_fhir.store import schema
from tests.store.migrating import migrate_to

TOKENS = [
    {"param": "code", "system": "s", "code": "b", "text": None},
    {"param": "code", "system": "s", "code": "a", "text": None},
    {"param": "code", "system": "t", "code": "c", "text": None},
    {"param": "category", "system": "s", "code": None, "text": None},  # no code: nothing to sort by
]
DATES = [  # the earliest start and the latest end are on different rows
    {"param": "date", "low": 10, "high": 50},
    {"param": "date", "low": 20, "high": 90},
]
REFERENCES = [
    {"param": "subject", "target_type": "Patient", "target_id": "z1", "url": None},
    {"param": "subject", "target_type": None, "target_id": None, "url": "http://example.org/Patient/a"},
]


def _flags(rows: list[dict[str, Any]]) -> list[tuple[bool, bool]]:
    return [(row["sort_asc"], row["sort_desc"]) for row in rows]


def test_the_lowest_and_the_highest_value_of_each_param_are_flagged_and_a_param_without_values_is_not() -> None:
    assert _flags(indexing.mark_sort_rows("token", TOKENS)) == [
        (False, False),
        (True, False),
        (False, True),
        (False, False),
    ]


def test_a_date_sorts_up_by_its_earliest_start_and_down_by_its_latest_end() -> None:
    assert _flags(indexing.mark_sort_rows("date", DATES)) == [(True, False), (False, True)]


def test_a_reference_sorts_by_its_target_id_or_else_its_url() -> None:
    marked = indexing.mark_sort_rows("reference", REFERENCES)
    assert [row["sort_value"] for row in marked] == ["z1", "http://example.org/Patient/a"]
    assert _flags(marked) == [(False, True), (True, False)]


def test_equal_values_flag_one_row_only() -> None:
    twice = [{"param": "code", "system": "s", "code": "a"}, {"param": "code", "system": "t", "code": "a"}]
    assert _flags(indexing.mark_sort_rows("token", twice)) == [(True, True), (False, False)]


def test_0011_flags_the_rows_written_before_it_as_the_store_flags_them(unmigrated_url: str) -> None:
    engine = create_engine(unmigrated_url)
    try:
        migrate_to(engine, "0010")
        key = {"res_type": "Observation", "res_id": "o1"}
        with engine.begin() as conn:
            for kind, rows in (("token", TOKENS), ("date", DATES), ("reference", REFERENCES)):
                conn.execute(_insert_at_0010(schema.INDEX_TABLES[kind].name, [{**key, **row} for row in rows]))

        migrate_to(engine, "0011")

        with engine.connect() as conn:
            for kind, rows in (("token", TOKENS), ("date", DATES), ("reference", REFERENCES)):
                index_table = schema.INDEX_TABLES[kind]
                value = "code" if kind == "token" else "low" if kind == "date" else "target_id"
                order = (index_table.c.param, index_table.c[value].asc().nulls_last())
                stored = conn.execute(select(index_table).order_by(*order)).mappings().all()
                expected = sorted(
                    indexing.mark_sort_rows(kind, rows), key=lambda r: (r["param"], r[value] is None, r[value])
                )
                assert [(r["sort_asc"], r["sort_desc"]) for r in stored] == _flags(expected), kind
                if kind == "reference":
                    assert [r["sort_value"] for r in stored] == [r["sort_value"] for r in expected]
    finally:
        engine.dispose()


def _insert_at_0010(name: str, rows: list[dict[str, Any]]) -> Any:
    """An insert of ``rows`` into the table as revision 0010 has it (without the columns 0011 adds)."""
    return insert(table(name, *(column(c) for c in rows[0]))).values(rows)
