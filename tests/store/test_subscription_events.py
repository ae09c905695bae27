"""Subscription event counters in the SQL store (table subscription_events): numbered from 1 per Subscription in the
write's transaction, never the same number twice under concurrent writes (threads and processes), none taken by a
rolled-back transaction."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import select

from iop_fhir.store import schema
from iop_fhir.store.sql import SqlStore


@pytest.fixture
def store(db_url: str) -> Iterator[SqlStore]:
    store = SqlStore(db_url)
    yield store
    store.close()


def _next(store: SqlStore, sub_id: str, now: int = 1_000) -> int:
    with store.write() as tx:
        return tx.next_subscription_event(sub_id, now)


def test_events_are_numbered_from_1_per_subscription(store: SqlStore) -> None:
    assert store.subscription_events("labs") is None
    assert [_next(store, "labs", now) for now in (1, 2, 3)] == [1, 2, 3]
    assert _next(store, "vitals", 4) == 1
    assert (store.subscription_events("labs"), store.subscription_events("vitals")) == (3, 1)
    with store.reading() as conn:
        rows = conn.execute(select(schema.subscription_events).order_by(schema.subscription_events.c.sub_id)).all()
    assert [tuple(row) for row in rows] == [("labs", 3, 3), ("vitals", 1, 4)]


def test_a_rolled_back_transaction_takes_no_number(store: SqlStore) -> None:
    _next(store, "labs")
    with pytest.raises(RuntimeError), store.write() as tx:
        assert tx.next_subscription_event("labs", 2_000) == 2
        raise RuntimeError("the write it would have notified failed")
    assert store.subscription_events("labs") == 1
    assert _next(store, "labs") == 2


def test_concurrent_increments_in_threads_never_give_the_same_number_twice(store: SqlStore) -> None:
    barrier = threading.Barrier(16)

    def take(_: int) -> int:
        try:
            barrier.wait(timeout=30)
        except threading.BrokenBarrierError:
            pass
        return _next(store, "labs")

    with ThreadPoolExecutor(max_workers=16) as pool:
        numbers = list(pool.map(take, range(128)))
    assert sorted(numbers) == list(range(1, 129))
    assert store.subscription_events("labs") == 128


def _process_worker(url: str, attempts: int, start: Any, out: Any) -> None:
    store = SqlStore(url)
    start.wait(60)
    out.put([_next(store, "labs") for _ in range(attempts)])
    store.close()


def test_concurrent_increments_in_processes_never_give_the_same_number_twice(store: SqlStore, db_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=_process_worker, args=(db_url, 25, start, out)) for _ in range(4)]
    for worker in workers:
        worker.start()
    start.set()
    numbers = [n for _ in workers for n in out.get(timeout=300)]
    for worker in workers:
        worker.join(60)
    assert sorted(numbers) == list(range(1, 101))
    assert store.subscription_events("labs") == 100
