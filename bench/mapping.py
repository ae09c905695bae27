"""Mapping + validation cost per IOP record kind, in process on one core.

    python bench/mapping.py                 # every contract payload, 2,000 rounds each
    python bench/mapping.py --rounds 5000 --kind session

One round of a record is what a POST /iop does before it touches the database: load the payload (marshmallow
schema), check codes and derive values (prepare), map it to FHIR resources, and validate every resource against
R4 and its profile. Prints median and p99 per record, the median of the part before validation (map ms: schema,
prepare, map), resources per record, and records/s (1 / mean). Targets:
a session with a three-analyte drug screen maps and validates in 2 ms or less; a group session of 12 attendees (each
a session like the contract's: attended, craving, three-analyte urine screen; one late, one no-show) in 15 ms or less.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any

from iop_fhir.config import Settings
from iop_fhir.iop import schemas
from iop_fhir.mapping import load_engine
from iop_fhir.r4 import validation
from iop_fhir.r4.profiles import ProfileRegistry

CONTRACT = Path(__file__).resolve().parents[2] / "shared" / "contract"
ENROLLMENT_ID = "6f1c2d9e-0000-4000-8000-000000000001"
KINDS = [
    "enrollment",
    "assessment",
    "treatment-plan",
    "session",
    "group-session",
    "medication",
    "consent",
    "discharge",
    "partner",
]
GROUP_SIZE = 12


def group_session() -> dict[str, Any]:
    """The contract group session with 12 attendees, each with what the contract session records of its patient."""
    group = payload("group-session", contract=True)
    session = payload("session")
    attendees = []
    for n in range(GROUP_SIZE):
        attendee = {k: session[k] for k in ("attendance", "craving_score", "drug_screen", "progress_note")}
        attendee["enrollment_id"] = f"6f1c2d9e-0000-4000-8000-{n + 1:012d}"
        if n == 1:
            attendee["attendance"] = "late"
        if n == GROUP_SIZE - 1:
            attendee = {"enrollment_id": attendee["enrollment_id"], "attendance": "no-show"}
        attendees.append(attendee)
    group["attendees"] = attendees
    return group


def context(kind: str, record: dict[str, Any]) -> dict[str, Any]:
    """What the service would know: an adult program; for a group, the same for each attendee."""
    if kind == "group-session":
        return {"members": [{"age_group": "adult"} for _ in record["attendees"]]}
    return {"age_group": "adult"}


def payload(kind: str, *, contract: bool = False) -> dict[str, Any]:
    if kind == "group-session" and not contract:
        return group_session()
    text = (CONTRACT / f"{kind}.json").read_text(encoding="utf-8").replace("{{enrollment_id}}", ENROLLMENT_ID)
    body: dict[str, Any] = json.loads(text)
    return body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--kind", choices=KINDS, nargs="+", default=KINDS)
    args = parser.parse_args(argv)

    settings = Settings.from_env()
    engine = load_engine(Path(settings.mappings_dir).resolve())
    profiles = ProfileRegistry.load(Path(settings.profiles_dir), settings.terminology_dir)
    print(f"{'kind':<16}{'resources':>10}{'median ms':>11}{'p99 ms':>9}{'map ms':>9}{'records/s':>11}")
    for kind in args.kind:
        body = payload(kind)
        times: list[float] = []
        mapping: list[float] = []
        count = 0
        gc.collect()
        for n in range(args.rounds + 50):
            start = time.perf_counter()
            record = schemas.load(kind, body)
            derived = engine.prepare(kind, record, context(kind, record))
            rid = engine.natural_key(kind, derived.record)
            produced = engine.map(kind, derived.record, rid)
            mapped = time.perf_counter() - start
            for item in produced:
                resource = item.resource
                issues = validation.validate(resource, expected_type=resource["resourceType"], model_check=False)
                issues += profiles.claimed_issues(resource)
                if any(i.severity == "error" for i in issues):
                    raise SystemExit(f"{kind}: {issues[0].diagnostics}")
            elapsed = time.perf_counter() - start
            if n >= 50:  # warm-up rounds fill the caches
                times.append(elapsed)
                mapping.append(mapped)
            count = len(produced)
        times.sort()
        median = statistics.median(times) * 1000
        p99 = times[int(len(times) * 0.99) - 1] * 1000
        rate = len(times) / sum(times)
        mapped_median = statistics.median(mapping) * 1000
        print(f"{kind:<16}{count:>10}{median:>11.3f}{p99:>9.3f}{mapped_median:>9.3f}{rate:>11,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
