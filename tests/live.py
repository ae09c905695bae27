"""`iop-fhir serve` as a real process (gunicorn) on a free port, for tests that talk to the service over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def command() -> list[str]:
    """The installed `iop-fhir` script beside this interpreter (or the module when it is not installed)."""
    script = Path(sys.executable).with_name("iop-fhir")
    return [str(script)] if script.exists() else [sys.executable, "-m", "iop_fhir.cli"]


@contextmanager
def serve(
    env: dict[str, str], log_path: Path, *, workers: int = 2, cwd: Path | None = None, args: tuple[str, ...] = ()
) -> Iterator[str]:
    """Runs `iop-fhir serve` (with ``args`` added) with ``env`` added to the environment; yields its base URL
    (http://127.0.0.1:PORT) once /health answers, and stops it afterwards (a server that did not exit cleanly fails
    the test)."""
    port = free_port()
    log = log_path.open("wb")
    process = subprocess.Popen(
        [*command(), "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers), *args],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=cwd,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or still starting
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        returncode = process.wait(timeout=30)
        log.close()
    assert returncode == 0, log_path.read_text()
