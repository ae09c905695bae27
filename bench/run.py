"""Throughput and latency of `iop-fhir serve` against a bare Flask app under the same gunicorn settings.

Starts each server as a subprocess on a fresh SQLite file, drives it from other processes (wrk if on PATH, else a
Python generator of processes x threads on keep-alive http.client connections) and prints req/s, p50 and p99 for
the bare endpoint, read-by-id, create, search, and the time of a 1,000-entry transaction, with the targets.

Every request carries `Authorization: Bearer <token>`: before the service starts, a client `bench` is registered on
its fresh database and a token minted for it with the CLI (`iop-fhir client add`, `iop-fhir token`), valid for
TOKEN_LIFETIME_S; the bare app gets the same header (and ignores it). So each measured FHIR request also verifies a
token and is audited (a read's row group-committed with others, a create's in its own transaction). The run first
checks that a read without the token answers 401 and one with it 200.

Then the same database is served once more with the audit switched off (`bench/run.py unaudited`: the app of
`iop-fhir serve` whose `iop_fhir.audit` is None, which only this benchmark sets; nothing in the service's settings
can) and read and search are measured again, to compare the server CPU per request with and without the audit.

    python bench/run.py                      # sync workers (gunicorn's default worker class)
    python bench/run.py --threads 1 4        # sync, then gthread with 4 threads per worker
    python bench/run.py --server gunicorn    # `iop-fhir serve --server gunicorn` (the bare app is always on gunicorn)
    python bench/run.py profile              # cProfile of each interaction in-process (where the time goes)
"""

from __future__ import annotations

import argparse
import cProfile
import http.client
import io
import multiprocessing
import os
import pstats
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

FHIR = "application/fhir+json"
LOINC = "http://loinc.org"
PATIENTS = 100
SEARCH_CODES = ["8867-4", "9279-1", "8310-5", "29463-7", "8302-2", "39156-5", "2708-6", "85354-9", "44261-6", "72109-2"]
CREATE_CODE = "59408-5"  # not in SEARCH_CODES, so that the create run does not change what the searches find
# Issue 14: read-by-id >= 60% of the bare endpoint, search >= 600/s, create >= 500/s, a 1,000-entry transaction <= 1 s,
# and the server CPU per read within 1.3 times that of a read with the audit switched off.
TARGETS = {"read_vs_bare": 0.60, "create": 500.0, "search": 600.0, "transaction_s": 1.0, "audit_cpu": 1.3}
BENCH_CLIENT = "bench"
BENCH_SCOPE = "system/*.cruds"
TOKEN_LIFETIME_S = 3600  # IOP_FHIR_TOKEN_LIFETIME of the token command and the server: longer than any run


# -- the request bodies ----------------------------------------------------------------------------------------


def observation(patient: int, code: str, value: float) -> dict[str, Any]:
    """A vital-sign-sized Observation (about 600 bytes), as an EHR interface sends them."""
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "vital-signs",
                        "display": "Vital Signs",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": code}], "text": f"LOINC {code}"},
        "subject": {"reference": f"Patient/bench-p{patient}"},
        "effectiveDateTime": f"2026-0{1 + patient % 9}-1{patient % 10}T08:30:00Z",
        "valueQuantity": {"value": value, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
    }


def patient_body(n: int) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": f"bench-p{n}",
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5", "value": f"MRN-{n:05d}"}],
        "name": [{"family": f"Bench{n}", "given": ["Pat"]}],
        "gender": ["female", "male", "other"][n % 3],
        "birthDate": f"19{50 + n % 50:02d}-0{1 + n % 9}-1{n % 10}",
    }


def transaction(size: int, offset: int) -> dict[str, Any]:
    entries = []
    for i in range(size):
        n = offset + i
        entries.append(
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": observation(n % PATIENTS, SEARCH_CODES[(n // PATIENTS) % len(SEARCH_CODES)], 60 + n % 40),
                "request": {"method": "POST", "url": "Observation"},
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


# -- servers -----------------------------------------------------------------------------------------------------


def _gunicorn_settings(workers: int, threads: int) -> dict[str, Any]:
    """The settings `iop-fhir serve` gives gunicorn (iop_fhir/cli.py), so that the bare app runs under the same."""
    return {
        "workers": workers,
        "threads": threads,
        "worker_class": "gthread" if threads > 1 else "sync",
        "accesslog": None,
        "timeout": 120,
        "keepalive": 5,
    }


def _serve_with(server_name: str, make_app: Any, port: int, workers: int, threads: int) -> bool:
    """Serves ``make_app()`` under waitress as `iop-fhir serve --server waitress` does; False for gunicorn."""
    if server_name != "waitress":
        return False
    from iop_fhir import serving
    from iop_fhir.config import Settings

    settings = Settings.from_env()
    serving.serve(make_app, settings, host="127.0.0.1", port=port, workers=workers, threads=threads, access_log=False)
    return True


def _serve_bare(port: int, workers: int, threads: int, server_name: str = "gunicorn") -> None:
    from flask import Flask, Response
    from gunicorn.app.base import BaseApplication

    app = Flask("bare")
    body = orjson.dumps({"resourceType": "Parameters", "parameter": [{"name": "status", "valueString": "ok"}]})

    @app.get("/bare")
    def bare() -> Response:
        return Response(body, content_type=f"{FHIR}; charset=utf-8")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    if _serve_with(server_name, lambda: app, port, workers, threads):
        return

    class Bare(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", f"127.0.0.1:{port}")
            for key, value in _gunicorn_settings(workers, threads).items():
                self.cfg.set(key, value)

        def load(self) -> Flask:
            return app

    Bare().run()


def _serve_unaudited(port: int, workers: int, threads: int, server_name: str = "gunicorn") -> None:
    """`iop-fhir serve` (the same app on IOP_FHIR_DATABASE_URL, the same gunicorn settings) with the audit switched
    off: what a read costs without its audit row, for comparison only."""
    from flask import Flask
    from gunicorn.app.base import BaseApplication

    from iop_fhir.app import create_app
    from iop_fhir.config import Settings

    settings = Settings.from_env()

    def unaudited_app() -> Flask:
        app = create_app(settings)
        app.extensions["iop_fhir.audit"] = None  # the switch: no trail, no audit row (security/guard.py)
        return app

    if _serve_with(server_name, unaudited_app, port, workers, threads):
        return

    class Unaudited(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", f"127.0.0.1:{port}")
            for key, value in _gunicorn_settings(workers, threads).items():
                self.cfg.set(key, value)

        def load(self) -> Flask:
            return unaudited_app()

    Unaudited().run()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def server(
    command: list[str], port: int, health: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{command} exited:\n{log.read().decode(errors='replace')}")
            try:
                if _request("127.0.0.1", port, "GET", health)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command} did not answer {health} within 60 s")
            time.sleep(0.2)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        log.close()


def workers_cpu(master: int) -> float | None:
    """CPU seconds (user + system) used so far by the gunicorn workers of `master`; None where /proc cannot say.

    On a shared or small machine req/s moves with whatever else runs; CPU per request much less, so it is
    printed beside the rates.
    """
    try:
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        total = 0
        for pid in children:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
        return total / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _headers(token: str | None, body: bytes | None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    if body is not None:
        headers["Content-Type"] = FHIR
    return headers


def _request(
    host: str, port: int, method: str, path: str, body: bytes | None = None, token: str | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=300)
    try:
        conn.request(method, path, body=body, headers=_headers(token, body))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# -- authorization -----------------------------------------------------------------------------------------------


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("iop-fhir")
    return [str(script)] if script.exists() else [sys.executable, "-m", "iop_fhir.cli"]


def mint_token(env: dict[str, str], workdir: Path) -> str:
    """An access token of the client `bench` (system/*.cruds), registered on the database of `env` with the CLI.

    Run with the server's own environment (database, IOP_FHIR_TOKEN_LIFETIME, and the issuer settings
    IOP_FHIR_BASE_URL / IOP_FHIR_AUTH_ISSUER if set), so that the server verifies the token: the signing key is
    made on first use and kept in that database.
    """
    key = workdir / "bench.pem"
    commands = [
        ["client", "add", BENCH_CLIENT, "--generate-key", str(key), "--scope", BENCH_SCOPE],
        ["token", "--client", BENCH_CLIENT],
    ]
    out = ""
    for command in commands:
        done = subprocess.run([*_cli(), *command], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"iop-fhir {' '.join(command)} exited {done.returncode}:\n{done.stderr}")
        out = done.stdout
    token = out.strip().splitlines()[-1] if out.strip() else ""
    if token.count(".") != 2:
        raise RuntimeError(f"iop-fhir token printed no JWT: {out[:200]!r}")
    return token


def check_auth(port: int, token: str) -> None:
    """One read without the token must answer 401, one with it 200, before anything is measured: a bench must
    never measure refusals. The authenticated read is of Patient/bench-p0, PUT just before it."""
    path = "/fhir/Patient/bench-p0"
    status, body = _request("127.0.0.1", port, "GET", path)
    if status != 401:
        raise RuntimeError(f"GET {path} without a token answered {status}, not 401: {body[:300]!r}")
    status, body = _request("127.0.0.1", port, "PUT", path, orjson.dumps(patient_body(0)), token)
    if status not in (200, 201):
        raise RuntimeError(f"PUT {path} with the bench token answered {status}: {body[:300]!r}")
    status, body = _request("127.0.0.1", port, "GET", path, token=token)
    if status != 200:
        raise RuntimeError(f"GET {path} with the bench token answered {status}, not 200: {body[:300]!r}")
    print(f"  auth: GET {path} 401 without the token, 200 with it", file=sys.stderr, flush=True)


# -- load generation -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """What to send: requests taken in turn (method, path, body) by every connection, each with the bearer
    `token` (if any)."""

    name: str
    requests: list[tuple[str, str, bytes | None]]
    token: str | None = None


@dataclass
class Result:
    name: str
    requests: int
    errors: int
    seconds: float
    sent: int = 0  # every request sent, warm-up included (what the server's CPU time was spent on)
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_us: float = float("nan")  # server CPU (user + system, all workers) per request

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def _worker(
    host: str, port: int, load: Load, threads: int, start: int, warmup: float, duration: float
) -> tuple[int, int, list[float], int]:
    """One generator process: `threads` keep-alive connections sending `load` for warmup + duration seconds."""
    begin = time.monotonic() + warmup
    end = begin + duration
    counts = [0] * threads
    sent_all = [0] * threads
    errors = [0] * threads
    latencies: list[list[float]] = [[] for _ in range(threads)]

    def run(t: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=120)
        n = start + t * 7919
        clock = time.monotonic
        while True:
            method, path, body = load.requests[n % len(load.requests)]
            n += 1
            headers = _headers(load.token, body)
            sent = clock()
            if sent >= end:
                break
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                status = response.status
            except (http.client.HTTPException, OSError):
                conn.close()  # the server closed an idle keep-alive connection: reconnect and go on
                continue
            done = clock()
            sent_all[t] += 1
            if sent >= begin:
                counts[t] += 1
                latencies[t].append(done - sent)
                if status >= 300:
                    errors[t] += 1
        conn.close()

    pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(counts), sum(errors), [x for part in latencies for x in part], sum(sent_all)


def drive_python(
    host: str, port: int, load: Load, *, connections: int, processes: int, warmup: float, duration: float
) -> Result:
    per_process = max(1, connections // processes)
    args = [(host, port, load, per_process, p * 104729, warmup, duration) for p in range(processes)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        parts = pool.starmap(_worker, args)
    latencies = sorted(x for _, _, lat, _ in parts for x in lat)
    result = Result(load.name, sum(p[0] for p in parts), sum(p[1] for p in parts), duration, sum(p[3] for p in parts))
    if latencies:
        result.p50_ms = latencies[len(latencies) // 2] * 1000
        result.p99_ms = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    return result


_WRK_SCRIPT = """
local requests = {}
%s
local authorization = %s
local n = 0
request = function()
  n = n + 1
  local r = requests[(n %% #requests) + 1]
  -- wrk.format adds Host and Content-Length to the table it is given: a fresh one for each request
  local headers = {}
  if authorization then headers["Authorization"] = authorization end
  if r[3] then headers["Content-Type"] = "application/fhir+json" end
  return wrk.format(r[1], r[2], headers, r[3])
end
"""


def _lua_string(value: str) -> str:
    return "[==[" + value + "]==]"


def drive_wrk(host: str, port: int, load: Load, *, connections: int, threads: int, duration: float) -> Result:
    lines = []
    for method, path, body in load.requests[:5000]:
        text = _lua_string(body.decode()) if body is not None else "nil"
        lines.append(f"requests[#requests + 1] = {{{_lua_string(method)}, {_lua_string(path)}, {text}}}")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        authorization = _lua_string(f"Bearer {load.token}") if load.token is not None else "nil"
        script.write(_WRK_SCRIPT % ("\n".join(lines), authorization))
    try:
        command = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration:g}s", "--latency"]
        out = subprocess.run(
            [*command, "-s", script.name, f"http://{host}:{port}/"], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(script.name)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    seconds = float(re.search(r"requests in ([\d.]+)(m?s)", out).group(1))  # type: ignore[union-attr]
    if re.search(r"requests in [\d.]+ms", out):
        seconds /= 1000
    errors = sum(int(m) for m in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    errors += sum(int(m) for m in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    result = Result(load.name, total, errors, seconds, total)
    result.p50_ms = _wrk_ms(re.search(r"\s50%\s+([\d.]+)(us|ms|s)", out))
    result.p99_ms = _wrk_ms(re.search(r"\s99%\s+([\d.]+)(us|ms|s)", out))
    return result


def _wrk_ms(match: re.Match[str] | None) -> float:
    if match is None:
        return float("nan")
    return float(match.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]


# -- the run ---------------------------------------------------------------------------------------------------


@dataclass
class Run:
    label: str
    results: list[Result] = field(default_factory=list)
    transaction_s: list[float] = field(default_factory=list)


def bench(args: argparse.Namespace, threads: int) -> Run:
    use_wrk = args.generator == "wrk" or (args.generator == "auto" and shutil.which("wrk") is not None)
    label = f"{args.workers} workers x {'sync' if threads == 1 else f'gthread {threads} threads'}"
    label += f", load by {'wrk' if use_wrk else f'python ({args.processes} processes)'}, {args.connections} conns"
    run = Run(label)

    def drive(port: int, load: Load, master: int) -> None:
        before = workers_cpu(master)
        if use_wrk:
            result = drive_wrk("127.0.0.1", port, load, connections=args.connections, threads=2, duration=args.duration)
        else:
            result = drive_python(
                "127.0.0.1",
                port,
                load,
                connections=args.connections,
                processes=args.processes,
                warmup=args.warmup,
                duration=args.duration,
            )
        after = workers_cpu(master)
        if before is not None and after is not None and result.sent:
            result.cpu_us = (after - before) / result.sent * 1e6
        run.results.append(result)
        print(
            f"  {result.name:<8} {result.rate:8.0f} req/s  p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms"
            f"  cpu {result.cpu_us:5.0f} us/req  ({result.requests} requests, {result.errors} errors)",
            file=sys.stderr,
            flush=True,
        )

    workdir = Path(tempfile.mkdtemp(prefix="iop-bench-"))
    try:
        env = {
            **os.environ,
            "IOP_FHIR_DATABASE_URL": args.database_url or f"sqlite:///{workdir / 'bench.db'}",
            "IOP_FHIR_TOKEN_LIFETIME": str(TOKEN_LIFETIME_S),
        }
        token = mint_token(env, workdir)

        port = _free_port()
        bare_cmd = [
            sys.executable,
            __file__,
            "bare",
            "--port",
            str(port),
            "--workers",
            str(args.workers),
            "--threads",
            str(threads),
            "--server",
            args.server,
        ]
        print(f"[{label}] bare Flask app under {args.server}", file=sys.stderr, flush=True)
        with server(bare_cmd, port, "/bare") as process:
            drive(port, Load("bare", [("GET", "/bare", None)], token), process.pid)

        port = _free_port()
        serve = [*_cli(), "serve", "--host", "127.0.0.1", "--port", str(port)]
        serve += ["--workers", str(args.workers), "--threads", str(threads), "--server", args.server]
        print(
            f"[{label}] iop-fhir serve --server {args.server} on {env['IOP_FHIR_DATABASE_URL']}",
            file=sys.stderr,
            flush=True,
        )
        with server(serve, port, "/health", env) as process:
            check_auth(port, token)
            for n in range(PATIENTS):
                status, body = _request(
                    "127.0.0.1", port, "PUT", f"/fhir/Patient/bench-p{n}", orjson.dumps(patient_body(n)), token
                )
                assert status in (200, 201), body[:500]
            for t in range(args.transactions):
                payload = orjson.dumps(transaction(args.transaction_size, t * args.transaction_size))
                began = time.perf_counter()
                status, body = _request("127.0.0.1", port, "POST", "/fhir", payload, token)
                run.transaction_s.append(time.perf_counter() - began)
                assert status == 200, body[:500]
            print(
                f"  transaction of {args.transaction_size}: median {statistics.median(run.transaction_s):.3f} s "
                f"(each: {', '.join(f'{s:.3f}' for s in run.transaction_s)})",
                file=sys.stderr,
                flush=True,
            )
            reads = [("GET", f"/fhir/Patient/bench-p{n}", None) for n in range(PATIENTS)]
            drive(port, Load("read", reads, token), process.pid)
            searches = [
                ("GET", f"/fhir/Observation?code={LOINC}%7C{code}&patient=Patient/bench-p{n}", None)
                for n in range(PATIENTS)
                for code in SEARCH_CODES
            ]
            status, body = _request("127.0.0.1", port, "GET", searches[0][1], token=token)
            matches = len(orjson.loads(body).get("entry", []))
            assert status == 200 and matches > 0, body[:500]
            drive(port, Load("search", searches, token), process.pid)
            creates = [
                ("POST", "/fhir/Observation", orjson.dumps(observation(n % PATIENTS, CREATE_CODE, 50 + n % 50)))
                for n in range(200)
            ]
            drive(port, Load("create", creates, token), process.pid)

        # The same database and loads with the audit switched off, for the CPU a read's audit costs.
        port = _free_port()
        unaudited = [sys.executable, __file__, "unaudited", "--port", str(port)]
        unaudited += ["--workers", str(args.workers), "--threads", str(threads), "--server", args.server]
        print(f"[{label}] the same, audit switched off", file=sys.stderr, flush=True)
        with server(unaudited, port, "/health", env) as process:
            drive(port, Load("read-noaudit", reads, token), process.pid)
            drive(port, Load("search-noaudit", searches, token), process.pid)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return run


def report(run: Run, cores: int) -> bool:
    """The table and the target checks of one run; True if every target is met.

    `cpu ceiling/s` is `cores` divided by the server CPU per request: the rate the workers would reach with
    those cores to themselves (no load generator, nothing else running). It reads through noise on a shared
    machine; the targets are checked on the measured req/s.
    """
    by_name = {r.name: r for r in run.results}
    print(f"\n{run.label}")
    print(f"{'':<13}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}{'cpu us/req':>12}{'cpu ceiling/s':>15}")
    for r in run.results:
        ceiling = cores * 1e6 / r.cpu_us
        print(
            f"{r.name:<13}{r.rate:>10.0f}{r.p50_ms:>10.2f}{r.p99_ms:>10.2f}{r.errors:>8}{r.cpu_us:>12.0f}"
            f"{ceiling:>15.0f}"
        )
    median = statistics.median(run.transaction_s)
    print(
        f"{'transaction':<13}{'':>10}{median * 1000:>10.0f}{max(run.transaction_s) * 1000:>10.0f}"
        f"   (ms per 1,000-entry transaction: median, max of {len(run.transaction_s)})"
    )
    read_share = by_name["read"].rate / by_name["bare"].rate
    cpu_share = by_name["bare"].cpu_us / by_name["read"].cpu_us
    audit_cpu = by_name["read"].cpu_us / by_name["read-noaudit"].cpu_us
    checks = [
        (f"read >= {TARGETS['read_vs_bare']:.0%} of bare", read_share >= TARGETS["read_vs_bare"], f"{read_share:.0%}"),
        (
            f"create >= {TARGETS['create']:.0f}/s",
            by_name["create"].rate >= TARGETS["create"],
            f"{by_name['create'].rate:.0f}/s",
        ),
        (
            f"search >= {TARGETS['search']:.0f}/s",
            by_name["search"].rate >= TARGETS["search"],
            f"{by_name['search'].rate:.0f}/s",
        ),
        (
            f"1,000-entry transaction <= {TARGETS['transaction_s']:g} s",
            median <= TARGETS["transaction_s"],
            f"{median:.2f} s",
        ),
        (
            f"read CPU <= {TARGETS['audit_cpu']:.1f}x without audit",
            audit_cpu <= TARGETS["audit_cpu"],
            f"{audit_cpu:.2f}x ({by_name['read'].cpu_us:.0f} / {by_name['read-noaudit'].cpu_us:.0f} us)",
        ),
        ("no errors", all(r.errors == 0 for r in run.results), str(sum(r.errors for r in run.results))),
    ]
    for name, ok, value in checks:
        print(f"  {'PASS' if ok else 'MISS'}  {name:<36} {value}")
    search_cpu = by_name["search"].cpu_us / by_name["search-noaudit"].cpu_us
    print(f"  (read/bare by server CPU per request: {cpu_share:.0%}; search CPU with/without audit: {search_cpu:.2f}x)")
    return all(ok for _, ok, _ in checks)


# -- in-process profile ------------------------------------------------------------------------------------------


def profile_token(app: Any) -> str:
    """A token of the client `bench` registered in-process (as tests/auth.py does; the private key is never used:
    the token is issued directly, as `iop-fhir token` does)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from iop_fhir.security.registry import issue_for_client
    from iop_fhir.security.tokens import jwk_thumbprint, public_jwk

    key = ec.generate_private_key(ec.SECP384R1())
    jwks = {"keys": [{**public_jwk(key), "kid": jwk_thumbprint(key), "alg": "ES384", "use": "sig"}]}
    registry = app.extensions["iop_fhir.clients"]
    registry.add(BENCH_CLIENT, jwks=jwks, scope=BENCH_SCOPE)
    token: str = issue_for_client(registry, app.extensions["iop_fhir.keys"], BENCH_CLIENT, None)[0]
    return token


def profile(args: argparse.Namespace) -> int:
    """cProfile of each interaction through the Flask test client on a fresh SQLite file (no HTTP, no gunicorn)."""
    from iop_fhir.app import create_app
    from iop_fhir.config import Settings

    workdir = Path(tempfile.mkdtemp(prefix="iop-profile-"))
    settings = Settings(
        database_url=f"sqlite:///{workdir / 'profile.db'}",
        base_url="http://bench/fhir",
        token_lifetime=TOKEN_LIFETIME_S,
    )
    app = create_app(settings)
    client = app.test_client()
    token = profile_token(app)
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"  # sent with every request of `client`
    headers = {"Content-Type": FHIR}
    try:
        assert app.test_client().get("/fhir/Patient/bench-p0").status_code == 401  # a client without the token
        for n in range(PATIENTS):
            put = client.put(f"/fhir/Patient/bench-p{n}", data=orjson.dumps(patient_body(n)), headers=headers)
            assert put.status_code in (200, 201), put.get_data()[:500]
        assert client.get("/fhir/Patient/bench-p0").status_code == 200
        seed = orjson.dumps(transaction(args.transaction_size, 0))
        assert client.post("/fhir", data=seed, headers=headers).status_code == 200
        bodies = [orjson.dumps(observation(n % PATIENTS, CREATE_CODE, 60)) for n in range(args.requests)]
        cases = {
            "read": lambda n: client.get(f"/fhir/Patient/bench-p{n % PATIENTS}"),
            "create": lambda n: client.post("/fhir/Observation", data=bodies[n], headers=headers),
            "search": lambda n: client.get(
                f"/fhir/Observation?code={LOINC}%7C{SEARCH_CODES[n % 10]}&patient=Patient/bench-p{n % PATIENTS}"
            ),
        }
        for name in args.cases:
            if name == "transaction":
                payload = orjson.dumps(transaction(args.transaction_size, args.transaction_size))
                calls, run = 1, lambda _n, body=payload: client.post("/fhir", data=body, headers=headers)
            else:
                calls, run = args.requests, cases[name]
            profiler = cProfile.Profile()
            began = time.perf_counter()
            profiler.enable()
            for n in range(calls):
                response = run(n)
                assert response.status_code < 300, response.get_data()[:500]
            profiler.disable()
            elapsed = time.perf_counter() - began
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats(args.sort).print_stats(args.top)
            print(f"\n=== {name}: {calls} calls, {elapsed / calls * 1000:.3f} ms each in-process (profiled) ===")
            print(out.getvalue())
    finally:
        app.extensions["iop_fhir.store"].close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="threads per worker; one run for each")
    parser.add_argument(
        "--server", choices=["gunicorn", "waitress"], default="waitress", help="the server of `iop-fhir serve`"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per load")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring (python generator)")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--processes", type=int, default=2, help="python generator processes")
    parser.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--transactions", type=int, default=5, help="1,000-entry transactions timed (and stored)")
    parser.add_argument("--transaction-size", type=int, default=1000)
    parser.add_argument("--database-url", help="instead of a fresh SQLite file (the database must be empty)")
    commands = parser.add_subparsers(dest="command")
    bare = commands.add_parser("bare", help="(internal) serve the bare Flask app under the same server")
    bare.add_argument("--port", type=int, required=True)
    bare.add_argument("--workers", type=int, default=2)
    bare.add_argument("--threads", type=int, default=1)
    bare.add_argument("--server", choices=["gunicorn", "waitress"], default="gunicorn")
    unaudited = commands.add_parser("unaudited", help="(internal) serve the app with the audit switched off")
    unaudited.add_argument("--port", type=int, required=True)
    unaudited.add_argument("--workers", type=int, default=2)
    unaudited.add_argument("--threads", type=int, default=1)
    unaudited.add_argument("--server", choices=["gunicorn", "waitress"], default="gunicorn")
    prof = commands.add_parser("profile", help="cProfile each interaction in-process")
    prof.add_argument("cases", nargs="*", default=["read", "create", "search", "transaction"])
    prof.add_argument("--requests", type=int, default=2000)
    prof.add_argument("--top", type=int, default=25)
    prof.add_argument("--sort", default="tottime")
    prof.add_argument("--transaction-size", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.command == "bare":
        _serve_bare(args.port, args.workers, args.threads, args.server)
        return 0
    if args.command == "unaudited":
        _serve_unaudited(args.port, args.workers, args.threads, args.server)
        return 0
    if args.command == "profile":
        return profile(args)
    runs = [bench(args, threads) for threads in args.threads]
    print(f"\nbench/run.py on {os.cpu_count()} CPUs; server and load generator share them")
    met = [report(run, min(args.workers, os.cpu_count() or 1)) for run in runs]
    return 0 if all(met) else 1


if __name__ == "__main__":
    sys.exit(main())
