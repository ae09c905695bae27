"""`iop-fhir serve` (default `--server waitress`): waitress in pre-forked processes sharing one listening socket.

Waitress reads each request whole (headers, then the body, to a temporary file past 512 KB) in its event loop before
a thread of its pool runs the app, so an idle or slowly-sending client holds a socket, never a thread:
``CHANNEL_TIMEOUT`` closes a connection that sends nothing for that long, ``CONNECTION_LIMIT`` bounds the
connections of one process, and a body over the app's limit (``max_body_bytes``), however framed, is refused with an
OperationOutcome like every error: by the app (limits.py) from one byte past it, or by waitress before the app runs
when far over it (``_error_response``). One waitress process is one interpreter (one core under the GIL), so the
parent forks ``--workers`` of them, like gunicorn's workers, restarts one that dies, and stops them all on SIGTERM or
SIGINT.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from iop_fhir.config import Settings

CHANNEL_TIMEOUT = 30  # seconds a connection may send nothing (no request begun, or a request stalled) before closing
CONNECTION_LIMIT = 1000  # open connections per process; beyond it, new ones wait in the listen backlog
BACKLOG = 2048
GC_YOUNGEST = 50_000  # allocations between collections of the youngest generation (Python: 700)
GC_OLDER = 20  # collections of one generation between collections of the next (Python: 10)
_FAILED = 3  # exit status of a worker whose app raised (failed to build, or waitress failed)
MAX_HEADER_BYTES = 65536  # request line and headers; the app's own limit on the target (limits.py) is far below

log = logging.getLogger("iop_fhir.access")


def settled(app: Any) -> Any:
    """``app``, built in a worker process that serves it until it exits, with what building it allocated (the FHIR
    definitions, profiles, terminology: hundreds of thousands of objects that live as long as the process) moved out
    of the garbage collector's reach. Otherwise every full collection walks them all, a pause of 100-200 ms that
    falls on whichever request triggers it.

    The youngest generation is then collected after GC_YOUNGEST allocations instead of Python's 700: a request's
    objects are freed by their reference counts when it ends, and the collector, run less often, no longer finds
    them alive mid-request and carries them into the older generations, whose collections then came every few
    requests (the outcomes report at a million resources: p50 67 -> 58 ms, slowest of 30 124 -> 67 ms)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNGEST, GC_OLDER, GC_OLDER)
    return app


class AccessLog:
    """One line per request on stderr, as gunicorn's access log of ``serve`` writes it: method, path (never the query
    string, which carries search values), status, size and duration."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        began = time.monotonic()
        seen: dict[str, str] = {}

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            seen["status"] = status.split(" ", 1)[0]
            seen["size"] = next((v for k, v in headers if k.lower() == "content-length"), "-")
            return start_response(status, headers, exc_info)

        try:
            return self.app(environ, start)  # type: ignore[no-any-return]
        finally:
            stamp = time.strftime("[%d/%b/%Y:%H:%M:%S %z]")
            millis = int((time.monotonic() - began) * 1000)
            line = f'{stamp} "{environ.get("REQUEST_METHOD")} {environ.get("PATH_INFO")}" '
            line += f"{seen.get('status', '-')} {seen.get('size', '-')} {millis}ms"
            print(line, file=sys.stderr, flush=True)


def _error_response(self: Any, ident: str | None = None) -> tuple[str, list[tuple[str, str]], bytes]:
    """Stands in for ``waitress.utilities.Error.to_response`` (plain text): an OperationOutcome, like every error."""
    import orjson

    from iop_fhir.errors import Issue, operation_outcome

    code = "too-costly" if self.code in (413, 414, 431) else "exception" if self.code >= 500 else "invalid"
    message = f"{self.reason}: {self.body}".rstrip(": ")
    if self.code == 413:
        message = "the request body is larger than the limit of IOP_FHIR_MAX_BODY_BYTES"
    body = orjson.dumps(operation_outcome([Issue(code, message, "body" if self.code == 413 else None)]))
    return f"{self.code} {self.reason}", [("Content-Type", "application/fhir+json; charset=utf-8")], body


def _child(listener: socket.socket, make_app: Callable[[], Any], settings: Settings, threads: int, log: bool) -> None:
    import waitress
    from waitress import utilities

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    utilities.Error.to_response = _error_response
    app = make_app()
    waitress.serve(
        AccessLog(app) if log else app,
        sockets=[listener],
        threads=threads,
        connection_limit=CONNECTION_LIMIT,
        channel_timeout=CHANNEL_TIMEOUT,
        cleanup_interval=min(CHANNEL_TIMEOUT, 10),
        max_request_header_size=MAX_HEADER_BYTES,
        # Waitress counts a chunked body with its chunk framing (up to 6 bytes a byte): it refuses only what is far
        # over the limit; the app (limits.py) refuses the rest, from one byte past it.
        max_request_body_size=8 * settings.max_body_bytes + 65536,
        ident="iop-fhir",
        _quiet=True,
    )


def serve(
    make_app: Callable[[], Any],
    settings: Settings,
    *,
    host: str,
    port: int,
    workers: int,
    threads: int,
    access_log: bool,
) -> int:
    """Serves the WSGI app ``make_app`` builds (once in each worker process, after the fork) until SIGTERM/SIGINT."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(BACKLOG)
    children: set[int] = set()
    stopping = False

    def spawn() -> None:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _child(listener, make_app, settings, threads, access_log)
            except BaseException:
                traceback.print_exc()
                code = _FAILED
            finally:
                os._exit(code)
        children.add(pid)

    def stop(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                children.discard(pid)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for _ in range(workers):
        spawn()
    failed = False
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        children.discard(pid)
        if stopping:
            continue
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == _FAILED:
            # The app could not be built or served (a database out of reach, a bad setting): stop, as gunicorn does
            # when a worker fails to boot, rather than restart it forever.
            print(f"iop-fhir: worker {pid} failed; stopping", file=sys.stderr)
            failed = True
            stop(signal.SIGTERM, None)
            continue
        print(f"iop-fhir: worker {pid} exited; starting another", file=sys.stderr)
        time.sleep(0.5)
        spawn()
    listener.close()
    return 1 if failed else 0
