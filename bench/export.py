"""Bulk Data $export: resources per second and memory of one system-level export of a seeded program.

A fresh database (a SQLite file in a temporary folder, or ``--database-url``) is seeded with the synthetic program of
``iop_fhir.demo.seed`` (``--patients``, default 250: ten times the demo's 25). Then, in a child process of its own
(so that its memory figures are the export's and not the seeding's), an administrator's client kicks off
``GET /fhir/$export`` through the HTTP API (Flask test client; every type, the audit trail included), the server's
background thread runs the job, the client polls the status URL until the manifest comes and streams every file,
counting lines. The export runs twice, the second time under tracemalloc (which slows Python down) for the peak of
Python allocations; the first gives the time and the growth of the process's peak resident set (ru_maxrss).

    python bench/export.py                               # 250 patients on SQLite
    python bench/export.py --patients 25 --database-url postgresql+psycopg://postgres@127.0.0.1:5432/bench
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

BENCH_CLIENT = "bench-export"
BASE = "http://bench/fhir"


def _settings(database_url: str) -> Any:
    from iop_fhir.config import Settings

    return Settings.from_env(database_url=database_url, base_url=BASE, token_lifetime=3600)


def seed(database_url: str, patients: int) -> dict[str, Any]:
    from iop_fhir.app import create_app
    from iop_fhir.demo import seed as seed_demo

    app = create_app(_settings(database_url))
    started = time.perf_counter()
    try:
        summary = seed_demo(app, patients=patients, seed=2026)
    finally:
        app.extensions["iop_fhir.store"].close()
    return {"seconds": time.perf_counter() - started, "resources": sum(summary.resources.values())}


def admin_token(app: Any) -> str:
    """An administrator's token of a client registered in-process (the private key is never used: the token is
    issued directly, as `iop-fhir token` does)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from iop_fhir.security.registry import issue_for_client
    from iop_fhir.security.tokens import jwk_thumbprint, public_jwk

    registry = app.extensions["iop_fhir.clients"]
    if registry.get(BENCH_CLIENT) is None:
        key = ec.generate_private_key(ec.SECP384R1())
        jwks = {"keys": [{**public_jwk(key), "kid": jwk_thumbprint(key), "alg": "ES384", "use": "sig"}]}
        registry.add(BENCH_CLIENT, jwks=jwks, scope="system/*.rs", admin=True)
    token: str = issue_for_client(registry, app.extensions["iop_fhir.keys"], BENCH_CLIENT, None)[0]
    return token


def export_once(database_url: str, *, trace: bool) -> dict[str, Any]:
    """One system export through the API, files streamed and counted; run in a child process."""
    from iop_fhir.app import create_app

    app = create_app(_settings(database_url))
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {admin_token(app)}"
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if trace:
        tracemalloc.start()
    started = time.perf_counter()
    kicked = client.get("/fhir/$export", headers={"Prefer": "respond-async", "Accept": "application/fhir+json"})
    assert kicked.status_code == 202, kicked.get_data(as_text=True)
    status = kicked.headers["Content-Location"].removeprefix(BASE.removesuffix("/fhir"))
    while (answer := client.get(status)).status_code == 202:
        time.sleep(0.05)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    manifest = answer.get_json()
    exported, nbytes, by_type = 0, 0, {}
    for item in manifest["output"]:
        download = client.get(item["url"].removeprefix(BASE.removesuffix("/fhir")), buffered=False)
        lines = 0
        for block in download.iter_encoded():
            lines += block.count(b"\n")
            nbytes += len(block)
        download.close()
        assert lines == item["count"], (item, lines)
        exported += lines
        by_type[item["type"]] = by_type.get(item["type"], 0) + lines
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] if trace else None
    if trace:
        tracemalloc.stop()
    client.delete(status)
    app.extensions["iop_fhir.store"].close()
    return {
        "resources": exported,
        "bytes": nbytes,
        "files": len(manifest["output"]),
        "errors": len(manifest["error"]),
        "seconds": seconds,
        "tracemalloc_peak": peak,
        "maxrss_growth_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before,
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "by_type": by_type,
    }


def _child(database_url: str, trace: bool) -> dict[str, Any]:
    arguments = [sys.executable, __file__, "--database-url", database_url, "--export-only"]
    run = subprocess.run([*arguments, *(["--trace"] if trace else [])], capture_output=True, text=True, check=False)
    if run.returncode != 0:
        sys.exit(f"the export failed:\n{run.stderr}")
    found: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=250, help="patients seeded (default 250)")
    parser.add_argument("--database-url", help="an empty database to seed (default: a temporary SQLite file)")
    parser.add_argument("--export-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.export_only:
        print(json.dumps(export_once(args.database_url, trace=args.trace)))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="iop-bench-export-"))
    database_url = args.database_url or f"sqlite:///{workdir / 'bench.db'}"
    print(f"seeding {args.patients} patients into {database_url.split('://')[0]} ...", file=sys.stderr)
    seeded = seed(database_url, args.patients)
    print(f"seeded {seeded['resources']:,} resources in {seeded['seconds']:.1f} s", file=sys.stderr)
    timed = _child(database_url, trace=False)
    traced = _child(database_url, trace=True)
    rate = timed["resources"] / timed["seconds"]
    print(f"exported      {timed['resources']:,} resources in {timed['files']} files ({timed['bytes'] / 1e6:.1f} MB)")
    print(f"time          {timed['seconds']:.2f} s, kick-off to last file downloaded")
    print(f"rate          {rate:,.0f} resources/s")
    print(
        f"peak memory   tracemalloc {traced['tracemalloc_peak'] / 1e6:.1f} MB (second run, {traced['seconds']:.2f} s)"
    )
    print(
        f"              peak resident set {timed['maxrss_kib'] / 1024:.0f} MiB (the app started and the export run),"
        f" {timed['maxrss_growth_kib'] / 1024:.1f} MiB of it reached during the export"
    )
    print("by type       " + ", ".join(f"{t} {n:,}" for t, n in sorted(timed["by_type"].items(), key=lambda x: -x[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
