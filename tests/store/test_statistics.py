"""SQLite's planner statistics: the store takes them when it opens a file that has none, and again after every
STATISTICS_EVERY resources the process writes; PostgreSQL keeps its own (the store never runs ANALYZE there)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from iop_fhir.config import Settings
from iop_fhir.runtime import open_store
from iop_fhir.store import sql
from iop_fhir.store.base import StoredResource, VersionFacts


def stat_rows(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as conn:
        found = conn.execute("SELECT name FROM sqlite_master WHERE name = 'sqlite_stat1'").fetchall()
        return conn.execute("SELECT tbl, idx FROM sqlite_stat1").fetchall() if found else []


def save_patients(store: sql.SqlStore, count: int, start: int = 0) -> None:
    with store.write() as tx:
        for n in range(start, start + count):
            res_id = f"p{n}"
            assert tx.current("Patient", res_id) is None
            body = b'{"resourceType":"Patient","id":"%s"}' % res_id.encode()
            tx.save(StoredResource("Patient", res_id, 1, 1_000_000 + n, False, body, "PUT"), {}, VersionFacts())


def test_a_new_sqlite_file_gets_statistics_when_the_store_opens_it(tmp_path: Path) -> None:
    path = tmp_path / "iop_fhir.db"
    store = open_store(Settings(database_url=f"sqlite:///{path}"))
    try:
        assert stat_rows(path), "ANALYZE left no sqlite_stat1 rows"
    finally:
        store.close()


def test_statistics_are_refreshed_after_every_so_many_resources_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "iop_fhir.db"
    store = open_store(Settings(database_url=f"sqlite:///{path}"))
    monkeypatch.setattr(sql, "STATISTICS_EVERY", 5)
    try:
        with sqlite3.connect(path) as conn:
            conn.execute("DELETE FROM sqlite_stat1")
        save_patients(store, 4)
        assert stat_rows(path) == []  # 4 written: not yet
        save_patients(store, 1, start=4)
        assert ("resources", "ix_resources_type_updated") in stat_rows(path)
    finally:
        store.close()


def test_existing_statistics_are_kept_when_the_store_opens_again(tmp_path: Path) -> None:
    path = tmp_path / "iop_fhir.db"
    open_store(Settings(database_url=f"sqlite:///{path}")).close()
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM sqlite_stat1")
        conn.execute("INSERT INTO sqlite_stat1 VALUES ('resources', 'ix_resources_type_updated', '7 7')")
    open_store(Settings(database_url=f"sqlite:///{path}")).close()
    assert stat_rows(path) == [("resources", "ix_resources_type_updated")]


def test_postgresql_connections_plan_each_query_for_its_values_without_jit_keeping_the_urls_options(
    postgres_url: str,
) -> None:
    store = sql.SqlStore(postgres_url)
    try:
        with store.reading() as conn:
            assert conn.exec_driver_sql("SHOW jit").scalar_one() == "off"
            assert conn.exec_driver_sql("SHOW plan_cache_mode").scalar_one() == "force_custom_plan"
            # the URL's options (the test schema as search_path) still apply
            assert conn.exec_driver_sql("SHOW search_path").scalar_one() in postgres_url
        assert store.refresh_statistics() is False  # PostgreSQL analyses on its own
    finally:
        store.close()


def test_statistics_are_taken_again_when_opening_migrates_the_file(tmp_path: Path) -> None:
    from sqlalchemy import create_engine

    from tests.store.migrating import migrate_to

    path = tmp_path / "iop_fhir.db"
    engine = create_engine(f"sqlite:///{path}")
    migrate_to(engine, "0012")  # before ix_resources_owner
    engine.dispose()
    with sqlite3.connect(path) as conn:
        rows = [("Patient", f"p{n}", 1, 1_000_000 + n, 0, b"{}") for n in range(3)]
        conn.executemany("INSERT INTO resources VALUES (?, ?, ?, ?, ?, ?)", rows)
        conn.execute("ANALYZE")
    assert ("resources", "ix_resources_live") in stat_rows(path)
    assert ("resources", "ix_resources_owner") not in stat_rows(path)
    open_store(Settings(database_url=f"sqlite:///{path}")).close()  # migrates to the newest revision
    assert ("resources", "ix_resources_owner") in stat_rows(path)
