"""What a crash costs the audit log: kill -9 of gunicorn workers of `iop-fhir serve` under load, then requests answered
against audit rows found, for a partner's client and for the program's own.

Starts `iop-fhir serve` (2 sync workers) on a fresh SQLite file (or --database-url), registers and mints tokens with
the CLI for a program client (system/*.cruds) and a partner's client (`client add --partner`, purpose TREAT), seeds
PATIENTS Patients, then drives searches from threads of this process on keep-alive loopback connections: half as the
program (each finds one Patient: a read of its record), half as the partner (no consent: each finds nothing, and is
audited all the same). Every request carries a number of its own in its query (`identifier:not=urn:crash|<n>`),
which its audit row keeps, so each answered request is matched to its row. While the load runs, one worker is killed
with SIGKILL every --kill-every seconds (gunicorn starts another); at the end the server is stopped with SIGTERM (its
workers commit what they hold) and the rows are read from the database.

For each kind of client it prints: requests answered (a 2xx or 4xx received), answered with their row, answered
without one (lost), and rows of requests whose answer never came (the connection died with the worker: the request
was audited, its answer lost). A partner's rows are committed before its answer is released, so "lost" must be 0 for
it; the program's reads are group-committed (IOP_FHIR_AUDIT_FLUSH_MS, IOP_FHIR_AUDIT_FLUSH_ROWS), so a kill loses at
most what the killed worker had queued. Loops are bounded by --duration and --max-requests; loopback only.

    python bench/audit_crash.py                       # 3 kills in 12 s
    python bench/audit_crash.py --kills 5 --duration 20
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import PATIENTS, _cli, _free_port, _request, patient_body  # noqa: E402

PROGRAM, PARTNER, PARTNER_ID = "crash-program", "crash-partner", "crash-test-partner"
NONCE_SYSTEM = "urn:crash"


@dataclass
class Tally:
    answered: set[int] = field(default_factory=set)  # request numbers answered 2xx/4xx
    statuses: Counter[int] = field(default_factory=Counter)
    failed: int = 0  # sent, but the connection died before an answer
    lock: threading.Lock = field(default_factory=threading.Lock)


def _token(env: dict[str, str], workdir: Path, client: str, *extra: str) -> str:
    key = workdir / f"{client}.pem"
    scope = "system/*.cruds" if client == PROGRAM else "system/*.rs"
    command = ["client", "add", client, "--generate-key", str(key), "--scope", scope, *extra]
    done = subprocess.run([*_cli(), *command], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"iop-fhir {' '.join(command)}: {done.stderr}")
    done = subprocess.run([*_cli(), "token", "--client", client], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"iop-fhir token --client {client}: {done.stderr}")
    return done.stdout.strip().splitlines()[-1]


PARTNER_RECORD = {
    "id": PARTNER_ID,
    "kind": "aftercare-provider",
    "name": "Crash Test Aftercare",
    "fhir_base_url": "http://127.0.0.1:9/R4",
    "auth": {"type": "none"},
}


def _iop_post(port: int, path: str, body: dict[str, object], token: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        conn.request("POST", path, body=orjson.dumps(body), headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _workers(master: int) -> list[int]:
    try:
        return [int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split()]
    except OSError:
        return []


def _drive(
    port: int, token: str, first: int, step: int, stop: threading.Event, limit: int, tally: Tally, deadline: float
) -> None:
    """Requests numbered first, first + step, ...: one at a time on a keep-alive connection, a new one after an
    error."""
    number = first
    conn: http.client.HTTPConnection | None = None
    sent = 0
    while not stop.is_set() and sent < limit and time.monotonic() < deadline:
        path = f"/fhir/Patient?_id=bench-p{number % PATIENTS}&identifier:not={NONCE_SYSTEM}%7C{number}"
        sent += 1
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
            response = conn.getresponse()
            response.read()
            with tally.lock:
                tally.statuses[response.status] += 1
                if response.status < 500:
                    tally.answered.add(number)
        except (OSError, http.client.HTTPException):
            with tally.lock:
                tally.failed += 1
            if conn is not None:
                conn.close()
            conn = None
            time.sleep(0.01)
        number += step
    if conn is not None:
        conn.close()


def _rows(database_url: str) -> dict[str, set[int]]:
    """The request numbers each client's audit rows name (from the search each row keeps)."""
    from iop_fhir.store.base import AuditQuery
    from iop_fhir.store.sql import SqlStore

    store = SqlStore(database_url)
    found: dict[str, set[int]] = {PROGRAM: set(), PARTNER: set()}
    try:
        for client in found:
            offset = 0
            while True:
                query = AuditQuery(where=((("client_id", client),),), offset=offset, count=5000)
                rows, _ = store.audit_rows(query)
                for row in rows:
                    values = parse_qs(urlsplit(row.query or "").query).get("identifier:not", [])
                    for value in values:
                        if value.startswith(f"{NONCE_SYSTEM}|"):
                            found[client].add(int(value.split("|", 1)[1]))
                if len(rows) < 5000:
                    break
                offset += 5000
    finally:
        store.close()
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=12.0, help="seconds of load (at most)")
    parser.add_argument("--kills", type=int, default=3, help="workers killed with SIGKILL during the load")
    parser.add_argument("--threads", type=int, default=4, help="connections per kind of client")
    parser.add_argument("--max-requests", type=int, default=20_000, help="requests per connection at most")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--database-url", help="instead of a fresh SQLite file (the database must be empty)")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="iop-crash-"))
    process: subprocess.Popen[bytes] | None = None
    try:
        url = args.database_url or f"sqlite:///{workdir / 'crash.db'}"
        env = {**os.environ, "IOP_FHIR_DATABASE_URL": url, "IOP_FHIR_TOKEN_LIFETIME": "3600"}
        program = _token(env, workdir, PROGRAM)
        port = _free_port()
        log = (workdir / "serve.log").open("wb")
        command = [*_cli(), "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(args.workers)]
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                if _request("127.0.0.1", port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"iop-fhir serve did not start; see {workdir / 'serve.log'}")
            time.sleep(0.2)
        for n in range(PATIENTS):
            body = orjson.dumps(patient_body(n))
            status, _ = _request("127.0.0.1", port, "PUT", f"/fhir/Patient/bench-p{n}", body, program)
            assert status in (200, 201), status
        status, answer = _iop_post(port, "/iop/partners", PARTNER_RECORD, program)
        assert status == 201, answer[:300]
        partner = _token(env, workdir, PARTNER, "--partner", PARTNER_ID, "--purpose", "TREAT")

        tallies = {PROGRAM: Tally(), PARTNER: Tally()}
        stop = threading.Event()
        end = time.monotonic() + args.duration
        threads = []
        step = 2 * args.threads
        for index in range(args.threads):
            for offset, (client, token) in enumerate(((PROGRAM, program), (PARTNER, partner))):
                first = 2 * index + offset
                thread = threading.Thread(
                    target=_drive,
                    args=(port, token, first, step, stop, args.max_requests, tallies[client], end),
                    daemon=True,
                )
                threads.append(thread)
                thread.start()
        killed = []
        for kill in range(args.kills):
            time.sleep(args.duration / (args.kills + 1))
            workers = _workers(process.pid)
            if workers:
                victim = workers[kill % len(workers)]
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
                print(f"  kill -9 worker {victim} ({kill + 1}/{args.kills})", flush=True)
        time.sleep(max(0.0, end - time.monotonic()))
        stop.set()
        for thread in threads:
            thread.join(60)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        process = None

        rows = _rows(url)
        print(f"\nbench/audit_crash.py: {len(killed)} workers killed with SIGKILL under load ({args.duration:g} s)")
        print(f"{'':<10}{'answered':>10}{'with row':>10}{'lost':>8}{'row, no answer':>16}{'no answer':>11}")
        lost_total = {}
        for client, tally in tallies.items():
            answered = tally.answered
            with_row = answered & rows[client]
            lost = answered - rows[client]
            orphan = rows[client] - answered
            lost_total[client] = len(lost)
            label = "partner" if client == PARTNER else "program"
            print(f"{label:<10}{len(answered):>10}{len(with_row):>10}{len(lost):>8}{len(orphan):>16}{tally.failed:>11}")
            print(f"{'':<10}statuses: {dict(sorted(tally.statuses.items()))}")
        flush_ms = os.environ.get("IOP_FHIR_AUDIT_FLUSH_MS", "10 (default)")
        print(f"IOP_FHIR_AUDIT_FLUSH_MS={flush_ms}")
        return 0 if lost_total[PARTNER] == 0 else 1
    finally:
        if process is not None:
            process.kill()
            process.wait(timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
