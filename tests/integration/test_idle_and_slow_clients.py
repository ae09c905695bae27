"""`iop-fhir serve` as shipped stays responsive while 200 clients hold connections open sending nothing and 20 send a
request body a byte a second: the server reads requests whole before the app runs, so they hold sockets, not the
threads that answer everyone else."""

from __future__ import annotations

import http.client
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from iop_fhir.app import create_app
from iop_fhir.config import Settings
from tests.auth import mint
from tests.live import serve

IDLE = 200
SLOW = 20
HOLD_S = 30.0  # as long as the issue asks; the idle timeout (30 s) closes the idle ones at about the end
SLOWEST_ANSWER_S = 1.0


@pytest.fixture
def service(tmp_path: Path, sqlite_template: Path) -> Iterator[tuple[str, str]]:
    shutil.copy(sqlite_template, tmp_path / "db.sqlite")
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    app = create_app(Settings(database_url=url, seed_conformance=False, token_lifetime=3600))
    token = mint(app, "system/*.cruds", admin=True)
    app.extensions["iop_fhir.store"].close()
    with serve({"IOP_FHIR_DATABASE_URL": url, "IOP_FHIR_SEED_CONFORMANCE": "false"}, tmp_path / "serve.log") as base:
        yield base, token


def _timed(port: int, method: str, path: str, token: str) -> tuple[int, float]:
    began = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, headers={"Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        response.read()
        return response.status, time.monotonic() - began
    finally:
        connection.close()


def test_normal_requests_answer_within_a_second_while_200_idle_and_20_slow_clients_hold_connections(
    service: tuple[str, str],
) -> None:
    base, token = service
    port = int(base.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(IDLE)]
    stop = threading.Event()

    def slow_body() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /fhir/Patient HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/fhir+json\r\n"
                + f"Authorization: Bearer {token}\r\nContent-Length: 100000\r\n\r\n".encode()
            )
            while not stop.wait(1.0):
                try:
                    sock.sendall(b" ")
                except OSError:
                    return

    slow = [threading.Thread(target=slow_body, daemon=True) for _ in range(SLOW)]
    try:
        for thread in slow:
            thread.start()
        time.sleep(1.0)  # every slow client has begun its request
        answers: list[tuple[str, int, float]] = []
        ends = time.monotonic() + HOLD_S
        while time.monotonic() < ends:
            for method, path in (("GET", "/health"), ("GET", "/fhir/Patient?_count=1"), ("GET", "/fhir/metadata")):
                status, took = _timed(port, method, path, token)
                answers.append((path, status, took))
            time.sleep(0.2)
    finally:
        stop.set()
        for sock in idle:
            sock.close()
        for thread in slow:
            thread.join(timeout=5)
    assert len(answers) >= 30
    assert [a for a in answers if a[1] != 200] == []
    slowest = max(answers, key=lambda a: a[2])
    assert slowest[2] < SLOWEST_ANSWER_S, slowest
