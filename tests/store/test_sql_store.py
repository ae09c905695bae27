"""The SQL store's own paths that the API tests do not reach."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from iop_fhir.store import sql
from iop_fhir.store.base import StoredResource, VersionFacts
from iop_fhir.store.schema import metadata
from iop_fhir.store.sql import SqlStore


def test_in_memory_database_reads_and_vreads_through_its_single_connection() -> None:
    store = SqlStore("sqlite://")
    metadata.create_all(store.engine)
    version = StoredResource("Patient", "p1", 1, 1_000_000, False, b'{"resourceType":"Patient","id":"p1"}', "POST")
    with store.write() as tx:
        assert tx.current("Patient", "p1") is None
        tx.save(
            version, {"token": [{"param": "gender", "system": None, "code": "other", "text": None}]}, VersionFacts()
        )
    assert store.read("Patient", "p1") == StoredResource("Patient", "p1", 1, 1_000_000, False, version.content)
    assert store.vread("Patient", "p1", 1) == version
    assert store.read("Patient", "p2") is None
    assert store.vread("Patient", "p1", 2) is None
    store.close()


class _LockedCursor:
    """A cursor on which the journal-mode switch finds the file locked ``times`` times: what SQLite answers, without
    calling the busy handler, to a connection that opens while another switches a new file to WAL or recovers it."""

    def __init__(self, times: int) -> None:
        self.left = times
        self.executed: list[str] = []

    def execute(self, statement: str) -> None:
        self.executed.append(statement)
        if statement == "PRAGMA journal_mode=WAL" and self.left > 0:
            self.left -= 1
            raise sqlite3.OperationalError("database is locked")


def test_a_locked_switch_to_wal_is_tried_again_until_it_succeeds() -> None:
    cursor = _LockedCursor(times=3)
    sql._use_wal(cursor, wait_s=5)
    assert cursor.executed.count("PRAGMA journal_mode=WAL") == 4


def test_a_switch_to_wal_still_locked_after_the_wait_raises() -> None:
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        sql._use_wal(_LockedCursor(times=10_000), wait_s=0.05)


def test_other_errors_of_the_switch_to_wal_are_not_retried() -> None:
    class Broken(_LockedCursor):
        def execute(self, statement: str) -> None:
            self.executed.append(statement)
            raise sqlite3.OperationalError("disk I/O error")

    cursor = Broken(times=0)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        sql._use_wal(cursor, wait_s=5)
    assert len(cursor.executed) == 1


def _open_at_once(url: str, count: int) -> tuple[list[str], list[BaseException]]:
    """``count`` stores connecting to ``url`` at the same moment: the journal mode each found, and what each raised."""
    stores = [SqlStore(url) for _ in range(count)]
    barrier = threading.Barrier(count)
    modes: list[str] = []
    errors: list[BaseException] = []

    def connect(store: SqlStore) -> None:
        barrier.wait()
        try:
            with store.engine.connect() as conn:
                modes.append(conn.exec_driver_sql("PRAGMA journal_mode").scalar_one())
        except BaseException as error:  # collected and asserted by the test
            errors.append(error)

    threads = [threading.Thread(target=connect, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()
    return modes, errors


def test_stores_opening_a_new_sqlite_file_at_once_all_connect_in_wal_mode(tmp_path: Path) -> None:
    for attempt in range(30):  # the race is narrow: 30 new files, 6 stores each
        modes, errors = _open_at_once(f"sqlite:///{tmp_path / f'new-{attempt}.db'}", 6)
        assert errors == []
        assert modes == ["wal"] * 6
