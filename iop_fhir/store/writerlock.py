"""Writers of one SQLite file take turns in a queue instead of polling.

SQLite lets one writer in at a time (``BEGIN IMMEDIATE``); a writer that finds the lock taken sleeps in SQLite's busy
handler (1, 2, 5, 10 ms and longer) and tries again, so two processes writing at once spend much of their time
asleep while the file is free. Here every write transaction of the service on a SQLite file (the store's, the audit
log's appends, the client registry's) first takes an exclusive ``flock`` on a lock file beside the database
(``<database>-writer``), and the kernel wakes the next waiter the moment the holder has committed. Threads of one
process queue on a lock of their own first, since a ``flock`` belongs to an open file and the threads share it.

The lock only orders iop-fhir's own writers: SQLite's locking still guarantees correctness (another program writing
the file meets the busy handler as before), and a process that dies holding the lock releases it with its files.
A thread that already holds the lock and opens another write transaction does not wait for itself: the inner one
meets SQLite's lock as it would without this module. PostgreSQL and in-memory SQLite need none of this.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from sqlalchemy import Engine

WAIT_S = 60  # as long as a SQLite connection waits for a lock (store/sql.py SQLITE_BUSY_S)


class WriterLock:
    def __init__(self, database: str, wait_s: float = WAIT_S) -> None:
        self.path = f"{database}-writer"
        self.wait_s = wait_s
        self._pid = -1
        self._fd = -1
        self._threads = threading.RLock()
        self._depth = threading.local()

    def _file(self) -> int:
        # A forked child (gunicorn's workers) opens its own file: a descriptor inherited from the parent shares the
        # parent's open file, and with it the parent's lock.
        if self._pid != os.getpid():
            self._threads = threading.RLock()
            self._depth = threading.local()
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._pid = os.getpid()
        return self._fd

    @contextmanager
    def held(self) -> Iterator[None]:
        fd = self._file()
        threads, depth = self._threads, self._depth
        if not threads.acquire(timeout=self.wait_s):
            raise sqlite3.OperationalError("database is locked")  # what SQLite says after its busy timeout
        try:
            outer = getattr(depth, "n", 0) == 0
            if outer:
                fcntl.flock(fd, fcntl.LOCK_EX)
            depth.n = getattr(depth, "n", 0) + 1
            try:
                yield
            finally:
                depth.n -= 1
                if outer:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            threads.release()


_LOCKS: dict[str, WriterLock] = {}
_LOCKS_GUARD = threading.Lock()


def for_engine(engine: Engine) -> WriterLock | None:
    """The writer lock of the engine's SQLite file (one per file in a process), or None where none is needed."""
    if engine.dialect.name != "sqlite":
        return None
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    path = os.path.abspath(database)
    with _LOCKS_GUARD:
        lock = _LOCKS.get(path)
        if lock is None:
            lock = _LOCKS[path] = WriterLock(path)
        return lock


def writing(engine: Engine) -> AbstractContextManager[Any]:
    """Held around one write transaction on ``engine``."""
    lock = for_engine(engine)
    return nullcontext() if lock is None else lock.held()
