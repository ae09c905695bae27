"""Program outcomes of the demo times ten (250 patients) on SQLite: how long the outcomes take, part by part.

The database is seeded with the synthetic program of ``iop_fhir.demo.seed`` (``--patients``, default 250; seed
2026) once and kept under bench/results/ (one file per patients and seed; ``--fresh`` seeds it again), then
ANALYZEd (SQLite's planner does without statistics here, but every run starts from the same footing). Each part is
run ``--rounds`` times after one warm-up round, and the median and max printed:

- loading the stays (``reader.stays()``: every record of the program read and grouped by enrollment, each
  discharge's transition timeline built from its Task's history);
- the program's outcomes over the whole period (``program.outcomes``), from stays already loaded;
- every stay's own outcomes (``patient.outcomes``), from stays already loaded;
- ``GET /iop/outcomes?from=&to=`` end to end through the Flask test client, with the access token of a program's
  client (the /iop API refuses partners' clients): token verification, the access checks and the audit trail
  (the request's row names every resource the answer was computed from) as for any request.

    python bench/outcomes.py                  # 250 patients, 7 rounds
    python bench/outcomes.py --patients 25 --rounds 20
    python bench/outcomes.py --fresh          # seed the cached database again

Target: the outcomes of 250 patients in 1 s or less (the median of the request when the service has it, else of
loading plus computing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

from inprocess import token  # bench/inprocess.py: the scripts run with bench/ on sys.path

RESULTS = Path(__file__).resolve().parent / "results"
BASE = "http://bench/fhir"
BENCH_CLIENT = "bench-outcomes"
TARGET_S = 1.0


def _settings(database_url: str) -> Any:
    from iop_fhir.config import Settings

    return Settings.from_env(database_url=database_url, base_url=BASE, token_lifetime=3600)


def seeded(patients: int, seed: int, fresh: bool) -> Path:
    """The SQLite file of the demo of ``patients`` and ``seed``, seeded now unless it is cached. A seeding is written
    to a file of its own and takes the cached name only once complete, so a stopped run leaves no half-seeded cache."""
    from iop_fhir.app import create_app
    from iop_fhir.demo import seed as seed_demo

    path = RESULTS / f"outcomes-demo-{patients}p-seed{seed}.db"
    if path.exists() and not fresh:
        print(
            f"using {path.relative_to(RESULTS.parent.parent)} (seeded before; --fresh to seed again)", file=sys.stderr
        )
        return path
    RESULTS.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.db")
    for stale in (partial, Path(f"{partial}-writer")):
        stale.unlink(missing_ok=True)
    print(f"seeding {patients} patients (seed {seed}) ...", file=sys.stderr)
    app = create_app(_settings(f"sqlite:///{partial}"))
    started = time.perf_counter()
    try:
        summary = seed_demo(app, patients=patients, seed=seed, progress=True)
    finally:
        app.extensions["iop_fhir.store"].close()
    print(
        f"seeded {sum(summary.resources.values()):,} resources in {time.perf_counter() - started:.0f} s",
        file=sys.stderr,
    )
    partial.replace(path)
    Path(f"{partial}-writer").unlink(missing_ok=True)
    return path


def timed(run: Callable[[], Any], rounds: int) -> tuple[list[float], Any]:
    """Seconds of each of ``rounds`` runs after one warm-up run, and what the last run returned."""
    result = run()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    return times, result


def line(name: str, times: list[float], note: str = "") -> None:
    median, worst = statistics.median(times) * 1000, max(times) * 1000
    print(f"{name:<44}{median:>11,.1f}{worst:>11,.1f}  {note}".rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=250, help="patients seeded (default 250: ten times the demo)")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds of each part, after one warm-up")
    parser.add_argument("--fresh", action="store_true", help="seed again even if a seeded database is cached")
    args = parser.parse_args(argv)

    from sqlalchemy import text

    from iop_fhir.app import create_app
    from iop_fhir.outcomes import patient, program

    path = seeded(args.patients, args.seed, args.fresh)
    app = create_app(_settings(f"sqlite:///{path}"))
    try:
        store = app.extensions["iop_fhir.store"]
        with store.engine.begin() as conn:
            conn.execute(text("ANALYZE"))
        reader = app.extensions["iop_fhir.outcomes"]
        today = date.today()
        load_times, loaded = timed(reader.stays, args.rounds)
        stays = loaded.stays
        first = min(s.admission for s in stays)
        last = max(s.last_day(today) for s in stays)
        period = program.Period(first, last)
        report_times, report = timed(lambda: program.outcomes(stays, reader.rules, period, today), args.rounds)
        each_times, _ = timed(lambda: [patient.outcomes(s, reader.rules, today) for s in stays], args.rounds)
        sessions = sum(len(s.sessions) for s in stays)

        print(f"bench/outcomes.py: the demo of {args.patients} patients (seed {args.seed}) on SQLite")
        print(f"  {len(stays)} stays, {sessions:,} sessions, {period.start} to {period.end}; {args.rounds} rounds")
        print(f"{'':<44}{'median ms':>11}{'max ms':>11}")
        line("load the stays (reader.stays)", load_times)
        line("program.outcomes, whole period", report_times)
        line(f"patient.outcomes of each of {len(stays)} stays", each_times)
        service = [a + b + c for a, b, c in zip(load_times, report_times, each_times, strict=True)]
        line("  load + program + every stay", service)

        query = f"/iop/outcomes?from={period.start}&to={period.end}"
        client = app.test_client()
        endpoints = {rule.endpoint for rule in app.url_map.iter_rules()}
        request_times: list[float] | None = None
        if not any(e.endswith("get_program_outcomes") for e in endpoints):
            print("GET /iop/outcomes: not available")
        else:
            program_token = token(app, BENCH_CLIENT, scope="system/*.rs")
            by_program = {"Authorization": f"Bearer {program_token}", "Accept": "application/json"}

            def get(headers: dict[str, str]) -> Any:
                response = client.get(query, headers=headers)
                if response.status_code != 200:
                    raise SystemExit(f"GET {query} answered {response.status_code}: {response.get_data()[:300]!r}")
                return response.get_json()

            request_times, answer = timed(lambda: get(by_program), args.rounds)
            same = answer.get("drug_screens") == report.get("drug_screens") and answer["stays"] == report["stays"]
            line("GET /iop/outcomes (program's client)", request_times, "" if same else "(differs from the above!)")
        writer = app.extensions["iop_fhir.audit"]
        if writer is not None:
            writer.flush()
    finally:
        app.extensions["iop_fhir.store"].close()

    measured, what = (request_times, "GET /iop/outcomes") if request_times else (service, "load + compute")
    median = statistics.median(measured)
    verdict = "PASS" if median <= TARGET_S else "FAIL"
    print(f"≤ 1 s: {verdict} ({what}, median {median:.3f} s for {args.patients} patients)")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
