"""How fast a transaction Bundle of 1,000 new Observations is ingested through ``POST /fhir``, authenticated and
audited as in ``iop-fhir serve``, on a database of its own (PostgreSQL ``bench_ingest``, dropped and created
again; or a SQLite file in a temporary directory).

``--patients`` Patients are PUT first; then ``--transactions`` Bundles of 1,000 POST entries (vital signs and labs
of those Patients, server-assigned ids), each timed on its own after ``--warmup`` untimed ones. It prints each
Bundle's seconds (and the CPU seconds of this process, the app's Python, which moves less with the neighbours on
a shared machine than the wall clock does), and the median, best and worst in resources/s. ``--profile`` runs the
timed Bundles under cProfile and prints the ``--top`` functions by ``--sort``.

    python bench/ingest.py                                  # PostgreSQL, 5 Bundles
    python bench/ingest.py --backend sqlite
    python bench/ingest.py --profile --top 40 --sort tottime

Target (PostgreSQL, 2 cores): >= 1,500 resources/s (the ingest target of bench/scale.py).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from inprocess import token  # bench/inprocess.py: the scripts run with bench/ on sys.path
from run import patient_body
from scale import LABS, VITALS
from scale import _observation as scale_observation

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432"
DATABASE = "bench_ingest"
BASE = "http://bench/fhir"
FHIR = "application/fhir+json"
TARGET = 1500.0  # resources/s, PostgreSQL


def _postgres_admin(statement: str) -> list[Any]:
    import psycopg

    with psycopg.connect(POSTGRES.replace("postgresql+psycopg", "postgresql") + "/postgres", autocommit=True) as conn:
        cursor = conn.execute(statement)
        return cursor.fetchall() if cursor.description else []


def server_cpu() -> float:
    """CPU seconds the PostgreSQL backends serving the benchmark's database have used so far (from /proc: the server
    runs on this machine); 0 where they cannot be read."""
    total = 0
    for (pid,) in _postgres_admin(f"SELECT pid FROM pg_stat_activity WHERE datname = '{DATABASE}'"):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def database(backend: str, directory: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{directory / 'ingest.db'}"
    _postgres_admin(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    _postgres_admin(f'CREATE DATABASE "{DATABASE}"')
    return f"{POSTGRES}/{DATABASE}"


def patient(n: int) -> dict[str, Any]:
    return {**patient_body(n), "id": f"ingest-p{n}"}


def observation(rng: random.Random, patients: int) -> dict[str, Any]:
    """A vital sign or lab of one of the Patients, as bench/scale.py's hospital data has them."""
    spec = rng.choice(VITALS + LABS)
    category = "vital-signs" if spec in VITALS else "laboratory"
    day = f"2026-{1 + rng.randrange(12):02d}-{1 + rng.randrange(28):02d}T08:30:00Z"
    found: dict[str, Any] = scale_observation(
        rng, spec, category, f"ingest-p{rng.randrange(patients)}", {"id": "-", "period": {"start": day}}
    )
    del found["id"], found["encounter"]
    return found


def bundle(rng: random.Random, patients: int, size: int) -> bytes:
    entries = [
        {"resource": observation(rng, patients), "request": {"method": "POST", "url": "Observation"}}
        for _ in range(size)
    ]
    return orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})


def run(args: argparse.Namespace) -> dict[str, Any]:
    from iop_fhir.app import create_app
    from iop_fhir.config import Settings

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as directory:
        url = database(args.backend, Path(directory))
        app = create_app(Settings.from_env(database_url=url, base_url=BASE, token_lifetime=3600))
        try:
            client = app.test_client()
            headers = {
                "Authorization": f"Bearer {token(app, 'bench-ingest', scope='system/*.cruds')}",
                "Content-Type": FHIR,
            }
            for n in range(args.patients):
                answer = client.put(f"/fhir/Patient/ingest-p{n}", data=orjson.dumps(patient(n)), headers=headers)
                if answer.status_code not in (200, 201):
                    raise SystemExit(f"PUT Patient answered {answer.status_code}: {answer.get_data()[:500]!r}")
            rng = random.Random(args.seed)
            bodies = [bundle(rng, args.patients, args.size) for _ in range(args.warmup + args.transactions)]
            profiler = cProfile.Profile() if args.profile else None
            seconds: list[float] = []
            cpu: list[float] = []  # this process's CPU (the app's Python, and SQLite's)
            server: list[float] = []  # PostgreSQL's backends' CPU
            postgres = args.backend == "postgresql"
            for n, body in enumerate(bodies):
                timed = n >= args.warmup
                if timed and profiler is not None:
                    profiler.enable()
                began_server = server_cpu() if postgres else 0.0
                began, began_cpu = time.perf_counter(), time.process_time()
                answer = client.post("/fhir", data=body, headers=headers)
                elapsed, used = time.perf_counter() - began, time.process_time() - began_cpu
                used_server = server_cpu() - began_server if postgres else 0.0
                if timed and profiler is not None:
                    profiler.disable()
                if answer.status_code != 200:
                    raise SystemExit(f"POST /fhir answered {answer.status_code}: {answer.get_data()[:500]!r}")
                if len(answer.get_json()["entry"]) != args.size:
                    raise SystemExit("the transaction-response does not answer every entry")
                if timed:
                    seconds.append(elapsed)
                    cpu.append(used)
                    server.append(used_server)
                spent = f"{used:.3f} s CPU" + (f", PostgreSQL {used_server:.3f} s" if postgres else "")
                label = "transaction" if timed else "warm-up transaction"
                print(f"  {label} of {args.size:,}: {elapsed:.3f} s ({spent})", file=sys.stderr)
        finally:
            app.extensions["iop_fhir.store"].close()
            if args.backend == "postgresql":
                _postgres_admin(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    median = statistics.median(seconds)
    rates = sorted(args.size / s for s in seconds)
    print(
        f"{args.backend}: {len(seconds)} transactions of {args.size:,} Observations"
        f"{' (profiled)' if profiler else ''}: median {median:.3f} s = {args.size / median:,.0f} resources/s, "
        f"best {rates[-1]:,.0f}/s, worst {rates[0]:,.0f}/s; app CPU median {statistics.median(cpu):.3f} s"
        + (f", PostgreSQL CPU median {statistics.median(server):.3f} s" if args.backend == "postgresql" else "")
        + (f" (target >= {TARGET:,.0f}/s)" if args.backend == "postgresql" else "")
    )
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(args.sort).print_stats(args.top)
        print(out.getvalue())
    return {"backend": args.backend, "seconds": seconds, "cpu": cpu, "server": server, "rate": args.size / median}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--transactions", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--size", type=int, default=1000, help="entries per transaction")
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="cProfile the timed transactions")
    parser.add_argument("--sort", default="tottime", help="pstats sort key (tottime, cumulative, ...)")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    result = run(args)
    return 0 if args.backend != "postgresql" or result["rate"] >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
