"""Group commit of the audit log's rows in one process (the runtime's ``audit``): a read takes no write transaction of
its own. Its rows join a queue that one background thread commits in a single transaction (store AuditLog
``append_audit``) once the oldest has waited ``interval`` seconds or ``batch`` rows are waiting, whichever comes first.

Durability:
- ``append``: the row is committed within ``interval`` (plus the time of one commit) unless the process dies first;
  a crash (kill -9) loses at most the rows queued since the last commit: at most ``batch`` rows, and at most those of
  the last ``interval`` seconds when the database keeps up. The program's own reads are audited this way.
- ``append_durable``: returns once the rows are committed (they are committed at once, with whatever else is queued),
  or raises AuditUnavailable: a partner's request is audited so before its response is released.
- A write's row is not queued at all: it is added in the write's own transaction (AuditLogTx), so it commits or rolls
  back with the write.

The queue holds at most ``capacity`` rows; an append waits for room (while the database is unreachable, say) and
raises AuditUnavailable after ``timeout``: a request is never answered unaudited because its row was dropped. A
failed commit is retried (with back-off) for queued rows; the rows of a durable append that failed are given up
and the append raises. The thread starts on first use (after a fork too: each gunicorn worker has its own) and ends
after ``idle`` seconds without rows; ``close`` (and interpreter exit) commits what is queued.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from iop_fhir.store.base import AuditLog, AuditRow

log = logging.getLogger(__name__)

INTERVAL_S = 0.010  # the longest a queued row waits for its commit (while the database keeps up)
BATCH = 256  # rows committed in one transaction at most
CAPACITY = 20_000  # rows queued at most before an append waits
TIMEOUT_S = 30.0  # how long an append waits for room, and a durable append or flush for its commit
IDLE_S = 1.0  # the thread ends after this long without rows (and starts again with the next)


class AuditUnavailable(Exception):
    """The audit log cannot take or commit rows now (the database fails, or the queue stays full)."""


@dataclass(eq=False)
class _Ticket:
    """What a durable append waits for: every one of its rows committed, or one of them given up."""

    remaining: int
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


@dataclass(eq=False)
class _Entry:
    seq: int
    row: AuditRow
    queued: float  # time.monotonic()
    ticket: _Ticket | None = None


class AuditWriter:
    """The audit log's writer in one process; see the module docstring for what each append guarantees."""

    def __init__(
        self,
        log: AuditLog,
        *,
        interval: float = INTERVAL_S,
        batch: int = BATCH,
        capacity: int = CAPACITY,
        timeout: float = TIMEOUT_S,
        idle: float = IDLE_S,
    ) -> None:
        if interval < 0 or batch < 1 or capacity < batch:
            raise ValueError("the audit log needs interval >= 0, batch >= 1 and capacity >= batch")
        self.log = log
        self.interval = interval
        self.batch = batch
        self.capacity = capacity
        self.timeout = timeout
        self.idle = idle
        self.commits = 0  # transactions committed by the thread (for tests and benchmarks)
        self._reset()
        # At exit, commit what is queued (a gunicorn worker stopped with SIGTERM exits through here).
        atexit.register(_close_at_exit, weakref.ref(self))

    def _reset(self) -> None:
        # Also in a child process after fork: the parent's lock may have been held, and its thread is not here.
        self._pid = os.getpid()
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Entry] = deque()
        self._inflight: list[_Entry] = []
        self._seq = 0
        self._urgent = 0  # durable rows queued or in flight: commit without waiting for the interval
        self._flushing = 0  # callers of flush() waiting
        self._failures = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- the API ------------------------------------------------------------------------------------------------

    def append(self, rows: Sequence[AuditRow]) -> None:
        """Queue ``rows``; they are committed within ``interval`` (group commit)."""
        self._put(rows, None)

    def append_durable(self, rows: Sequence[AuditRow]) -> None:
        """Commit ``rows`` (with whatever else is queued) and return once they are; AuditUnavailable if they could
        not be committed within ``timeout``."""
        if not rows:
            return
        ticket = _Ticket(len(rows))
        self._put(rows, ticket)
        if not ticket.done.wait(self.timeout):
            raise AuditUnavailable(f"the audit log did not commit within {self.timeout:g} s")
        if ticket.error is not None:
            raise AuditUnavailable(f"the audit log could not commit ({type(ticket.error).__name__})") from None

    def flush(self, timeout: float | None = None) -> None:
        """Return once every row queued before the call is committed (or given up): what this process audited so far
        is then in the database for any reader. AuditUnavailable after ``timeout`` (default: the writer's)."""
        limit = self.timeout if timeout is None else timeout
        self._check_fork()
        with self._cond:
            target = self._seq
            if self._settled(target):
                return
            self._flushing += 1
            self._cond.notify_all()
            try:
                if not self._cond.wait_for(lambda: self._settled(target), limit):
                    raise AuditUnavailable(f"the audit log did not commit within {limit:g} s")
            finally:
                self._flushing -= 1

    def pending(self) -> int:
        """Rows queued or being committed."""
        with self._cond:
            return len(self._queue) + len(self._inflight)

    def close(self, timeout: float | None = None) -> None:
        """Commit what is queued and stop the thread; later appends start it again."""
        if self._pid != os.getpid():
            return
        try:
            self.flush(timeout)
        except AuditUnavailable:
            log.error("audit log: %d rows could not be committed at close", self.pending())
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.timeout if timeout is None else timeout)
        with self._cond:
            self._closed = False

    # -- the queue ----------------------------------------------------------------------------------------------

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            self._reset()

    def _settled(self, seq: int) -> bool:
        first_queued = self._queue[0].seq if self._queue else seq + 1
        first_inflight = self._inflight[0].seq if self._inflight else seq + 1
        return min(first_queued, first_inflight) > seq

    def _put(self, rows: Sequence[AuditRow], ticket: _Ticket | None) -> None:
        if not rows:
            return
        self._check_fork()
        with self._cond:
            if len(self._queue) + len(rows) > self.capacity:
                room = lambda: len(self._queue) + len(rows) <= max(self.capacity, len(rows))  # noqa: E731
                if not self._cond.wait_for(room, self.timeout):
                    raise AuditUnavailable(f"the audit log's queue stayed full for {self.timeout:g} s")
            was_empty = not self._queue
            now = time.monotonic()
            for row in rows:
                self._seq += 1
                self._queue.append(_Entry(self._seq, row, now, ticket))
            if ticket is not None:
                self._urgent += len(rows)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="iop-fhir-audit-log", daemon=True)
                self._thread.start()
            elif was_empty or ticket is not None or len(self._queue) >= self.batch:
                # Waking the thread for each row would cost more than committing it: it wakes for the first row,
                # a full batch or a durable row, and otherwise when the oldest row has waited the interval.
                self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: bool(self._queue) or self._closed, self.idle) or not self._queue:
                    self._thread = None  # idle, or closed with nothing queued: the next append starts another
                    return
                deadline = self._queue[0].queued + self.interval
                while len(self._queue) < self.batch and not (self._urgent or self._flushing or self._closed):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                self._inflight = [self._queue.popleft() for _ in range(min(self.batch, len(self._queue)))]
                taken = self._inflight
            error: Exception | None = None
            try:
                self.log.append_audit([entry.row for entry in taken])
            except Exception as exc:  # never PHI: the type only
                error = exc
            with self._cond:
                self._settle(taken, error)
                self._inflight = []
                self._cond.notify_all()
                failures = self._failures
            if error is not None:
                time.sleep(min(1.0, 0.01 * 2**failures))

    def _settle(self, taken: list[_Entry], error: Exception | None) -> None:
        if error is None:
            self.commits += 1
            self._failures = 0
            for entry in taken:
                if entry.ticket is not None:
                    self._urgent -= 1
                    entry.ticket.remaining -= 1
                    if entry.ticket.remaining == 0:
                        entry.ticket.done.set()
            return
        self._failures += 1
        log.error("audit log: committing %d rows failed (%s); retrying", len(taken), type(error).__name__)
        kept = []
        for entry in taken:
            if entry.ticket is None:
                kept.append(entry)
                continue
            # The request waiting for it answers 500 and discloses nothing: its row is given up, not retried.
            self._urgent -= 1
            entry.ticket.error = error
            entry.ticket.done.set()
        self._queue.extendleft(reversed(kept))


def _close_at_exit(ref: weakref.ref[AuditWriter]) -> None:
    writer = ref()
    if writer is not None:
        writer.close()
