"""Mapping + validation cost per IOP record kind, in process on one core.

    python bench/mapping.py                 # every contract payload, 2,000 rounds each
    python bench/mapping.py --rounds 5000 --kind session

One round of a record is what a POST /iop does before it touches the database: load the payload (marshmallow
schema), check codes and derive values (prepare), map it to FHIR resources, and validate every resource against
R4 and its profile. Prints median and p99 per record, resources per record, and records/s (1 / mean). Target:
a session with a three-analyte drug screen maps and validates in 2 ms or less.
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
KINDS = ["enrollment", "assessment", "treatment-plan", "session", "consent", "discharge", "partner"]


def payload(kind: str) -> dict[str, Any]:
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
    print(f"{'kind':<16}{'resources':>10}{'median ms':>11}{'p99 ms':>9}{'records/s':>11}")
    for kind in args.kind:
        body = payload(kind)
        times: list[float] = []
        count = 0
        gc.collect()
        for n in range(args.rounds + 50):
            start = time.perf_counter()
            record = schemas.load(kind, body)
            derived = engine.prepare(kind, record, {"age_group": "adult"})
            rid = engine.natural_key(kind, derived.record)
            produced = engine.map(kind, derived.record, rid)
            for item in produced:
                resource = item.resource
                issues = validation.validate(resource, expected_type=resource["resourceType"], model_check=False)
                issues += profiles.claimed_issues(resource)
                if any(i.severity == "error" for i in issues):
                    raise SystemExit(f"{kind}: {issues[0].diagnostics}")
            elapsed = time.perf_counter() - start
            if n >= 50:  # warm-up rounds fill the caches
                times.append(elapsed)
            count = len(produced)
        times.sort()
        median = statistics.median(times) * 1000
        p99 = times[int(len(times) * 0.99) - 1] * 1000
        rate = len(times) / sum(times)
        print(f"{kind:<16}{count:>10}{median:>11.3f}{p99:>9.3f}{rate:>11,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
