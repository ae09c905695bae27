"""The audit log's group commit (privacy/auditlog.py), against a log that records its transactions: rows of reads are
committed together once the interval has passed or the batch is full, a durable append returns only once its rows
are committed, flush waits for everything queued before it, and nothing is dropped when a commit fails."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from iop_fhir.privacy.auditlog import AuditUnavailable, AuditWriter
from iop_fhir.store.base import AuditRow


def row(n: int) -> AuditRow:
    return AuditRow(id=f"r{n}", recorded=n, action="read", outcome="0", client_id="c")


class Log:
    """An audit log whose transactions are lists of rows; ``fail`` makes the next commits raise."""

    def __init__(self) -> None:
        self.transactions: list[list[str]] = []
        self.fail = 0
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()

    def append_audit(self, rows: Sequence[AuditRow]) -> None:
        self.gate.wait(5)
        with self.lock:
            if self.fail:
                self.fail -= 1
                raise ConnectionError("database gone")
            self.transactions.append([r.id for r in rows])

    @property
    def committed(self) -> list[str]:
        with self.lock:
            return [i for t in self.transactions for i in t]


def test_rows_appended_within_the_interval_are_committed_in_one_transaction() -> None:
    log = Log()
    writer = AuditWriter(log, interval=0.2, batch=100)
    writer.append([row(1)])
    writer.append([row(2), row(3)])
    assert log.committed == []  # the oldest row has not waited the interval yet
    writer.flush()
    assert log.transactions == [["r1", "r2", "r3"]]


def test_a_full_batch_is_committed_without_waiting_for_the_interval() -> None:
    log = Log()
    writer = AuditWriter(log, interval=60, batch=2)
    writer.append([row(1), row(2), row(3)])
    deadline = time.monotonic() + 5
    while not log.transactions and time.monotonic() < deadline:
        time.sleep(0.01)
    assert log.transactions[0] == ["r1", "r2"]
    writer.close()
    assert log.committed == ["r1", "r2", "r3"]


def test_a_queued_row_is_committed_within_the_interval_without_any_flush() -> None:
    log = Log()
    writer = AuditWriter(log, interval=0.005, batch=100)
    writer.append([row(1)])
    deadline = time.monotonic() + 5
    while not log.committed and time.monotonic() < deadline:
        time.sleep(0.001)
    assert log.committed == ["r1"]


def test_a_durable_append_returns_only_once_its_rows_are_committed() -> None:
    log = Log()
    writer = AuditWriter(log, interval=60, batch=100)
    writer.append([row(1)])
    writer.append_durable([row(2)])  # does not wait a minute: it is committed at once, with what is queued
    assert log.transactions == [["r1", "r2"]]


def test_a_durable_append_that_cannot_be_committed_raises_and_queued_rows_are_retried() -> None:
    log = Log()
    log.fail = 1
    writer = AuditWriter(log, interval=60, batch=100)
    writer.append([row(1)])
    with pytest.raises(AuditUnavailable):
        writer.append_durable([row(2)])
    writer.flush()
    assert log.committed == ["r1"]  # the program's row is kept and committed; the refused disclosure's is not


def test_flush_waits_for_a_commit_in_progress() -> None:
    log = Log()
    writer = AuditWriter(log, interval=0, batch=100)
    log.gate.clear()
    writer.append([row(1)])
    time.sleep(0.05)  # the thread now holds the row, in a commit that waits at the gate
    threading.Timer(0.1, log.gate.set).start()
    writer.flush()
    assert log.committed == ["r1"]


def test_flush_gives_up_after_its_timeout_while_the_database_fails() -> None:
    log = Log()
    log.fail = 10**6
    writer = AuditWriter(log, interval=0, batch=100)
    writer.append([row(1)])
    with pytest.raises(AuditUnavailable):
        writer.flush(timeout=0.2)
    log.fail = 0
    writer.flush()
    assert log.committed == ["r1"]  # retried until the database came back


def test_an_append_waits_for_room_and_gives_up_when_the_queue_stays_full() -> None:
    log = Log()
    log.gate.clear()
    writer = AuditWriter(log, interval=0, batch=1, capacity=2, timeout=0.2)
    writer.append([row(1)])
    time.sleep(0.05)  # r1 is being committed (held at the gate)
    writer.append([row(2), row(3)])
    with pytest.raises(AuditUnavailable):
        writer.append([row(4)])
    log.gate.set()
    writer.flush(timeout=5)
    assert log.committed == ["r1", "r2", "r3"]


def test_the_thread_ends_when_idle_and_starts_again_with_the_next_row() -> None:
    log = Log()
    writer = AuditWriter(log, interval=0, batch=10, idle=0.05)
    writer.append([row(1)])
    writer.flush()
    time.sleep(0.3)
    assert writer._thread is None
    writer.append([row(2)])
    writer.flush()
    assert log.committed == ["r1", "r2"]
