"""Delivery under faults, against an independent FHIR server (../shared/tools/ehr-server) behind a proxy that fails
on purpose: 500s, 429 with Retry-After, a partner that hangs past the timeout, connections dropped before and after
the partner applied the request, a worker killed mid-delivery, two workers at once. Afterwards every transition has
arrived exactly once (counted by identifier at the receiver) and nothing is dead."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from iop_fhir.exchange import outbox
from iop_fhir.mapping import ids
from iop_fhir.runtime import run_worker
from tests.conftest import running_ehr_server

SHARED = Path(__file__).resolve().parents[3] / "shared"
CONTRACT = SHARED / "contract"

pytestmark = pytest.mark.peers
OUTCOME_500 = b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"exception"}]}'


class FaultProxy:
    """Forwards to the real server, except for the faults queued in `script`, one per request:
    "500", "429" (Retry-After: 1), "hang" (answers nothing for `hang_s`), "drop" (closes the connection without
    forwarding), "lost" (forwards, lets the partner apply it, then closes without answering)."""

    def __init__(self, upstream: str, hang_s: float = 3.0) -> None:
        self.upstream = upstream
        self.script: list[str] = []
        self.hang_s = hang_s
        self.lock = threading.Lock()
        self.seen: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy.lock:
                    fault = proxy.script.pop(0) if proxy.script else "pass"
                    proxy.seen.append(fault)
                if fault == "500":
                    self._answer(500, OUTCOME_500)
                elif fault == "429":
                    self._answer(429, b"", {"Retry-After": "1"})
                elif fault == "hang":
                    time.sleep(proxy.hang_s)
                    self.close_connection = True
                elif fault == "drop":
                    self.close_connection = True
                else:
                    upstream = requests.request(
                        self.command,
                        proxy.upstream + self.path,
                        data=body,
                        headers={k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")},
                        timeout=30,
                    )
                    if fault == "lost":
                        self.close_connection = True
                        return
                    self._answer(upstream.status_code, upstream.content, {"Content-Type": "application/fhir+json"})

            def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def ehr_server() -> Iterator[str]:
    """Served at the root, so that the proxy forwards paths unchanged."""
    with running_ehr_server("--base", "/") as base:
        yield base


@pytest.fixture
def proxy(ehr_server: str) -> Iterator[FaultProxy]:
    requests.post(f"{ehr_server}/_reset", timeout=10)
    fault_proxy = FaultProxy(ehr_server)
    yield fault_proxy
    fault_proxy.close()


def contract(kind: str, enrollment_id: str | None = None) -> dict[str, Any]:
    text = (CONTRACT / f"{kind}.json").read_text(encoding="utf-8")
    payload: dict[str, Any] = json.loads(text.replace("{{enrollment_id}}", enrollment_id or ""))
    return payload


def transitions(client: Any, base: str, count: int) -> list[str]:
    """`count` patients, each discharged to the aftercare partner with consent: one delivery each."""
    partner = contract("partner")
    partner.update(fhir_base_url=base, auth={"type": "none"})
    assert client.post("/iop/partners", json=partner).status_code == 201
    discharges = []
    for n in range(count):
        enrollment = contract("enrollment")
        enrollment["patient"]["identifiers"][0]["value"] = f"TEST-{n:04d}"
        enrollment_id = client.post("/iop/enrollments", json=enrollment).get_json()["id"]
        consent = contract("consent", enrollment_id)
        del consent["expires_on"]  # in force whenever the test runs (consents are decided on the day)
        assert client.post("/iop/consents", json=consent).status_code == 201
        payload = contract("discharge", enrollment_id)
        del payload["goal_outcomes"]  # these patients have no treatment plan
        response = client.post("/iop/discharges", json=payload)
        assert response.status_code == 201, response.get_json()
        discharges.append(response.get_json()["id"])
    return discharges


def copies_at_partner(base: str, discharge_id: str) -> int:
    identifier = f"{ids.RECORD_SYSTEM}|{ids.identifier_value('discharge', discharge_id, 'referral-task')}"
    bundle = requests.get(f"{base}/Task", params={"identifier": identifier}, timeout=10).json()
    return len(bundle.get("entry", []))


def drain(app: Any, settings: Any, deadline_s: float = 60.0) -> None:
    store = app.extensions["iop_fhir.store"]
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        run_worker(settings, once=True, store=store)
        pending, _ = store.deliveries(status="pending")
        if not pending:
            return
        time.sleep(0.1)
    raise AssertionError("deliveries still pending after the deadline")


def test_every_transition_arrives_exactly_once_through_errors_throttling_hangs_and_lost_answers(
    app: Any, client: Any, proxy: FaultProxy, ehr_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox, "BASE_DELAY_S", 0.05)  # the backoff shape, compressed to test time
    settings = replace(app.config["IOP_FHIR"], partner_timeout=0.5)
    discharges = transitions(client, proxy.base, 6)
    proxy.script = ["500", "429", "hang", "drop", "lost", "500", "lost"]
    started = time.monotonic()
    drain(app, settings)
    store = app.extensions["iop_fhir.store"]
    rows, _ = store.deliveries(record_kind="discharge")
    assert {r.status for r in rows} == {"delivered"}
    assert [copies_at_partner(ehr_server, d) for d in discharges] == [1] * 6
    for res_type in ("Patient", "ServiceRequest", "CarePlan", "Consent"):
        assert len(requests.get(f"{ehr_server}/{res_type}", timeout=10).json().get("entry", [])) == 6, res_type
    assert sum(r.attempts for r in rows) == 6 + 7  # one extra attempt per injected fault
    assert "429" in proxy.seen and time.monotonic() - started >= 1.0  # Retry-After: 1 was honoured


def _worker_process(database_url: str, lease: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "IOP_FHIR_DATABASE_URL": database_url, "IOP_FHIR_WORKER_LEASE_SECONDS": str(lease)}
    return subprocess.Popen(
        [sys.executable, "-m", "iop_fhir.cli", "worker", "--poll", "0.1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_a_worker_killed_mid_delivery_loses_nothing_and_the_next_one_finishes(
    app: Any, client: Any, proxy: FaultProxy, ehr_server: str
) -> None:
    settings = app.config["IOP_FHIR"]
    discharges = transitions(client, proxy.base, 3)
    proxy.hang_s = 30.0
    proxy.script = ["hang"]
    killed = _worker_process(settings.database_url, lease=2)
    deadline = time.monotonic() + 20
    while "hang" not in proxy.seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "hang" in proxy.seen
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=10)
    store = app.extensions["iop_fhir.store"]
    assert "delivering" in {r.status for r in store.deliveries(record_kind="discharge")[0]}
    time.sleep(2.2)  # the dead worker's lease runs out
    drain(app, replace(settings, worker_lease_seconds=2))
    assert {r.status for r in store.deliveries(record_kind="discharge")[0]} == {"delivered"}
    assert [copies_at_partner(ehr_server, d) for d in discharges] == [1] * 3


def test_two_workers_at_once_deliver_each_transition_once(
    app: Any, client: Any, proxy: FaultProxy, ehr_server: str
) -> None:
    # On PostgreSQL the workers claim with FOR UPDATE SKIP LOCKED; on SQLite the write lock serialises claims.
    settings = app.config["IOP_FHIR"]
    discharges = transitions(client, proxy.base, 12)
    workers = [_worker_process(settings.database_url, lease=30) for _ in range(2)]
    try:
        store = app.extensions["iop_fhir.store"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if {r.status for r in store.deliveries(record_kind="discharge", count=100)[0]} == {"delivered"}:
                break
            time.sleep(0.2)
    finally:
        for process in workers:
            process.send_signal(signal.SIGTERM)
        for process in workers:
            assert process.wait(timeout=20) == 0
    rows, _ = store.deliveries(record_kind="discharge", count=100)
    assert {r.status for r in rows} == {"delivered"}
    assert sum(r.attempts for r in rows) == 12  # no row was delivered twice
    assert [copies_at_partner(ehr_server, d) for d in discharges] == [1] * 12
