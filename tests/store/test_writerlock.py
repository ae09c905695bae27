"""The SQLite writer lock (store/writerlock.py): writers of one file take turns, across processes and threads."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from pathlib import Path

from sqlalchemy import create_engine

from iop_fhir.store import writerlock
from iop_fhir.store.sql import SqlStore


def _hold(path: str, started: multiprocessing.synchronize.Event, seconds: float) -> None:
    lock = writerlock.WriterLock(path)
    with lock.held():
        started.set()
        time.sleep(seconds)


def test_a_writer_in_another_process_waits_until_the_holder_releases(tmp_path: Path) -> None:
    path = str(tmp_path / "db.sqlite")
    started = multiprocessing.get_context("fork").Event()
    holder = multiprocessing.get_context("fork").Process(target=_hold, args=(path, started, 0.4))
    holder.start()
    assert started.wait(10)
    began = time.monotonic()
    with writerlock.WriterLock(path).held():
        waited = time.monotonic() - began
    holder.join(10)
    assert waited >= 0.2


def test_threads_of_one_process_take_turns(tmp_path: Path) -> None:
    lock = writerlock.WriterLock(str(tmp_path / "db.sqlite"))
    inside, most = [0], [0]

    def write() -> None:
        for _ in range(50):
            with lock.held():
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                time.sleep(0.0005)
                inside[0] -= 1

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert most[0] == 1


def test_a_thread_holding_the_lock_may_open_another_write_without_waiting_for_itself(tmp_path: Path) -> None:
    lock = writerlock.WriterLock(str(tmp_path / "db.sqlite"), wait_s=1)
    with lock.held(), lock.held():
        pass
    # and the lock is free again afterwards, for another thread
    taken = threading.Event()

    def other() -> None:
        with lock.held():
            taken.set()

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(5)
    assert taken.is_set()


def test_a_forked_child_locks_its_own_open_file(tmp_path: Path) -> None:
    path = str(tmp_path / "db.sqlite")
    lock = writerlock.WriterLock(path)
    with lock.held():  # the parent opens the file first
        pass
    parent_fd = lock._fd
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()

    def child() -> None:
        with lock.held():
            queue.put((lock._fd, lock._pid == os.getpid()))

    process = ctx.Process(target=child)
    process.start()
    child_fd, own = queue.get(timeout=10)
    process.join(10)
    assert own
    assert child_fd != parent_fd  # the inherited descriptor stays open in the child: a new one has another number


def test_only_sqlite_files_get_a_writer_lock(tmp_path: Path) -> None:
    assert writerlock.for_engine(create_engine("sqlite://")) is None
    assert writerlock.for_engine(create_engine("postgresql+psycopg://u@127.0.0.1/test")) is None
    file_engine = create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    lock = writerlock.for_engine(file_engine)
    assert lock is not None and lock.path == f"{tmp_path / 'a.db'}-writer"
    assert writerlock.for_engine(create_engine(f"sqlite:///{tmp_path / 'a.db'}")) is lock


def test_the_store_takes_the_writer_lock_around_each_write_transaction(tmp_path: Path) -> None:
    store = SqlStore(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        lock = writerlock.for_engine(store.engine)
        assert lock is not None
        seen: list[bool] = []

        def probe() -> None:
            # another thread cannot take the lock while the write transaction is open
            seen.append(lock._threads.acquire(timeout=0.05))
            if seen[-1]:
                lock._threads.release()

        with store.write():
            thread = threading.Thread(target=probe)
            thread.start()
            thread.join(5)
        assert seen == [False]
        thread = threading.Thread(target=probe)
        thread.start()
        thread.join(5)
        assert seen == [False, True]
    finally:
        store.close()
