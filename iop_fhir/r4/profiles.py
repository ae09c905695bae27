"""Checks a resource against the project's profiles (StructureDefinition snapshots in ``profiles/``): cardinality,
fixed and pattern values, bindings, types, reference targets, slices (https://hl7.org/fhir/R4/profiling.html) and
the invariants a profile adds to R4 (its own and those of a US Core base, evaluated with fhirpathpy). The US Core
StructureDefinitions of ``profiles/us-core/`` (and the US Core value sets there) are read for the extensions their
slices name, and to check a resource against a US Core profile when asked to by name.

Pure: ``ProfileRegistry.load`` reads files once; ``check`` takes and returns plain data. Each issue's expression is
a FHIRPath into the resource (``CarePlan.category``, ``CareTeam.participant[1].role``,
``Encounter.extension('https://iop-fhir.org/fhir/StructureDefinition/session-attendance')``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import fhirpathpy
import orjson
from fhirpathpy.engine.nodes import ResourceNode
from fhirpathpy.models import models

from iop_fhir.errors import Issue
from iop_fhir.r4 import validation

R4_PREFIX = "http://hl7.org/fhir/StructureDefinition/"
FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"


def fhir_type(element_type: dict[str, Any]) -> str:
    """The FHIR type of an ElementDefinition.type: FHIRPath system types (Extension.url) name theirs in an
    extension."""
    code: str = element_type["code"]
    if code.startswith("http://hl7.org/fhirpath/System."):
        for ext in element_type.get("extension", ()):
            if ext.get("url") == FHIR_TYPE_EXT:
                return str(ext["valueUrl"])
        return "string"
    return code


# A value set by system: the codes of each system, or None where any code of the system is in (a whole external
# code system, or a filter this module does not evaluate).
Codes = dict[str, frozenset[str] | None]
MAX_LISTED_CODES = 20


def _cap(code: str) -> str:
    return code[0].upper() + code[1:]


def _without_version(url: str) -> str:
    return url.split("|", 1)[0]


@dataclass(frozen=True)
class _Invariant:
    """A constraint of the snapshot that R4 does not define: a US Core one or the profile's own (R4's are left to
    the R4 validation)."""

    key: str
    severity: str
    human: str
    expression: str


@cache
def _compiled(expression: str) -> Callable[..., list[Any]]:
    return fhirpathpy.compile(expression, models["r4"])


# An invariant's result depends only on the members its expression names. Evaluated on the object cut down to those
# members, equal cut-down objects give equal results, so results are remembered by it: the 36 drug-screen
# Observations of a group session differ in ids and subjects, not in what us-core-2 or us-core-3 read. Expressions
# that can reach beyond the members they name (the whole of $this, children, descendants, resolve, variables) are
# always evaluated on the whole object; a primitive value is remembered as it is.
_WHOLE = re.compile(r"\$this\b(?!\s*(is|as)\b)|descendants|children|repeat|resolve|%|trace|aggregate|conformsTo")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RESULTS: dict[tuple[str, str, bytes], list[Any]] = {}
_MOST_RESULTS = 8192


@cache
def _names(expression: str) -> frozenset[str] | None:
    """The member names an expression may navigate (every identifier in it), or None if it may reach others."""
    if _WHOLE.search(expression):
        return None
    return frozenset(_NAME.findall(expression.replace("'", " ' ")))


def _members(value: dict[str, Any], names: frozenset[str]) -> dict[str, Any]:
    """The members of ``value`` an expression naming ``names`` can reach: a name, its choice-type forms (value:
    valueQuantity) and their primitive extensions (_name)."""
    kept: dict[str, Any] = {}
    for key, member in value.items():
        bare = key[1:] if key.startswith("_") else key
        if bare in names or any(bare.startswith(name) and bare[len(name) : len(name) + 1].isupper() for name in names):
            kept[key] = member
    return kept


def _evaluate(expression: str, value: Any, type_code: str) -> list[Any]:
    if isinstance(value, dict):
        names = _names(expression)
        if names is None:
            return _compiled(expression)(ResourceNode.create_node(value, type_code))
        cut: Any = _members(value, names | {"resourceType"})
    elif isinstance(value, str | int | float | bool):  # a primitive is its own key
        cut = value
    else:
        return _compiled(expression)(ResourceNode.create_node(value, type_code))
    key = (expression, type_code, orjson.dumps(cut, option=orjson.OPT_SORT_KEYS))
    found = _RESULTS.get(key)
    if found is None:
        found = _compiled(expression)(ResourceNode.create_node(cut, type_code))
        if len(_RESULTS) >= _MOST_RESULTS:
            _RESULTS.clear()
        _RESULTS[key] = found
    return found


@dataclass(eq=False)
class _Node:
    """One element of a snapshot, with its children and slices."""

    element_id: str
    name: str  # the last path segment: category, value[x]
    min: int
    max: int | None  # None: unbounded
    repeats: bool  # a JSON array (the base max is not 1)
    types: tuple[str, ...]
    targets: frozenset[str] | None  # Reference target types; None: any
    extension_url: str | None  # an extension slice's definition
    fixed: Any = None
    pattern: Any = None
    min_value: Any = None
    max_value: Any = None
    binding: tuple[str, str] | None = None  # (strength, value set URL)
    profiled: bool = False  # set in the profile's differential, not inherited from its base
    slicing: list[dict[str, str]] | None = None
    invariants: tuple[_Invariant, ...] = ()
    children: list[_Node] = field(default_factory=list)
    slices: list[_Node] = field(default_factory=list)

    def json_names(self) -> list[str]:
        """The element's JSON property names (one per type of a choice element, value[x]: valueQuantity, ...)."""
        return self._json_names

    @cached_property
    def _json_names(self) -> list[str]:
        if self.name.endswith("[x]"):
            return [self.name[:-3] + _cap(t) for t in self.types]
        return [self.name]

    def child(self, name: str) -> _Node | None:
        for node in self.children:
            if node.name == name:
                return node
        return None


@dataclass
class _Profile:
    url: str
    type: str
    definition: dict[str, Any]
    root: _Node


def _compile(sd: dict[str, Any], type_of: dict[str, str]) -> _Node:
    """The snapshot as a tree; ``type_of`` gives the resource type of each project profile URL."""
    differential = {el["id"] for el in sd.get("differential", {}).get("element", [])}
    nodes: dict[str, _Node] = {}
    root: _Node | None = None
    for el in sd["snapshot"]["element"]:
        element_id: str = el["id"]
        node = _node(el, element_id in differential, type_of)
        nodes[element_id] = node
        if root is None:
            root = node
            continue
        parent_id, last = element_id.rsplit(".", 1)
        if ":" in last:
            sliced = nodes.get(f"{parent_id}.{last.split(':', 1)[0]}")
            if sliced is not None:
                sliced.slices.append(node)
        elif parent_id in nodes:
            nodes[parent_id].children.append(node)
    assert root is not None
    return root


def _node(el: dict[str, Any], profiled: bool, type_of: dict[str, str]) -> _Node:
    types = tuple(fhir_type(t) for t in el.get("type") or ())
    targets: set[str] = set()
    extension_url = None
    for t in el.get("type") or ():
        for url in t.get("targetProfile", ()):
            url = _without_version(url)
            # a profile of another guide that is not at hand: its type is unknown, so any target passes
            targets.add(type_of.get(url) or (url[len(R4_PREFIX) :] if url.startswith(R4_PREFIX) else "Resource"))
        if t.get("code") == "Extension" and t.get("profile"):
            extension_url = _without_version(t["profile"][0])
    base_max = (el.get("base") or {}).get("max", el["max"])
    node = _Node(
        element_id=el["id"],
        name=el["path"].rsplit(".", 1)[-1],
        min=int(el.get("min", 0)),
        max=None if el["max"] == "*" else int(el["max"]),
        repeats=base_max != "1",
        types=types,
        targets=None if not targets or "Resource" in targets else frozenset(targets),
        extension_url=extension_url,
        profiled=profiled,
        slicing=(el.get("slicing") or {}).get("discriminator"),
        invariants=tuple(
            _Invariant(c["key"], c.get("severity", "error"), c.get("human", ""), c["expression"])
            for c in el.get("constraint") or ()
            if c.get("expression") and c.get("source") and not c["source"].startswith(R4_PREFIX)
        ),
    )
    for key, value in el.items():
        if key.startswith("fixed"):
            node.fixed = value
        elif key.startswith("pattern"):
            node.pattern = value
        elif key.startswith("minValue"):
            node.min_value = value
        elif key.startswith("maxValue"):
            node.max_value = value
    binding = el.get("binding") or {}
    if binding.get("strength") in ("required", "extensible") and binding.get("valueSet"):
        node.binding = (binding["strength"], _without_version(binding["valueSet"]))
    return node


class ProfileRegistry:
    """The project's StructureDefinitions and the terminology their bindings name."""

    def __init__(
        self,
        definitions: list[dict[str, Any]],
        value_sets: dict[str, dict[str, Any]] | None = None,
        code_systems: dict[str, dict[str, Any]] | None = None,
        bases: list[dict[str, Any]] | None = None,
    ) -> None:
        """``definitions``: the project's StructureDefinitions; ``bases``: those of other guides they build on
        (US Core), used for the types of their URLs and for the extensions slices name, and known for an explicit
        ``check`` ($validate with a profile), but neither listed by ``profiles`` nor checked as claimed."""
        self._definitions = sorted(definitions, key=lambda sd: str(sd["url"]))
        self._value_sets = value_sets or {}
        self._code_systems = code_systems or {}
        self._expanded: dict[str, Codes | None] = {}
        everything = [*(bases or []), *definitions]
        type_of = {sd["url"]: sd["type"] for sd in everything}
        compiled = {sd["url"]: _Profile(sd["url"], sd["type"], sd, _compile(sd, type_of)) for sd in everything}
        self._profiles = {sd["url"]: compiled[sd["url"]] for sd in definitions}
        self._bases = {url: p for url, p in compiled.items() if url not in self._profiles and p.type != "Extension"}
        self._extensions = {url: p for url, p in compiled.items() if p.type == "Extension"}

    @classmethod
    def load(cls, profiles_dir: Path, terminology_dir: Path | None = None) -> ProfileRegistry:
        """The StructureDefinitions of ``profiles_dir`` (and of its ``us-core`` folder, as bases) and the ValueSets
        and CodeSystems of ``terminology_dir`` and of the ``us-core`` folder (any may be missing: nothing is loaded
        from it)."""
        definitions = [r for r in _read(profiles_dir) if r.get("resourceType") == "StructureDefinition"]
        us_core = _read(profiles_dir / "us-core")
        bases = [r for r in us_core if r.get("resourceType") == "StructureDefinition"]
        value_sets: dict[str, dict[str, Any]] = {}
        code_systems: dict[str, dict[str, Any]] = {}
        for resource in [*us_core, *(_read(terminology_dir) if terminology_dir is not None else [])]:
            if resource.get("resourceType") == "ValueSet" and resource.get("url"):
                value_sets[resource["url"]] = resource
            elif resource.get("resourceType") == "CodeSystem" and resource.get("url"):
                code_systems[resource["url"]] = resource
        return cls(definitions, value_sets, code_systems, bases)

    def known(self, url: str) -> bool:
        """A profile ``check`` can check against: the project's, or one of the guides they build on."""
        url = _without_version(url)
        return url in self._profiles or url in self._bases

    def profiles(self) -> list[dict[str, Any]]:
        """Every StructureDefinition (profiles and extension definitions), by URL."""
        return list(self._definitions)

    def check(self, resource: dict[str, Any], profile_url: str) -> list[Issue]:
        """Every way ``resource`` departs from the profile (errors; warnings for extensible bindings and
        bindings that cannot be checked). Raises KeyError for a profile this registry does not know."""
        url = _without_version(profile_url)
        profile = self._profiles[url] if url in self._profiles else self._bases[url]
        res_type = resource.get("resourceType")
        if res_type != profile.type:
            return [
                Issue(
                    "invalid",
                    f"profile {profile.url} is for {profile.type} resources, not {res_type}",
                    "resourceType",
                )
            ]
        out: list[Issue] = []
        checker = _Checker(self, profile.url, out)
        checker.invariants(resource, profile.root, profile.type, profile.type)
        checker.children(resource, profile.root, profile.type)
        return out

    def claimed_issues(self, resource: Any) -> list[Issue]:
        """The issues of ``resource`` against each of the project's profiles its ``meta.profile`` names. Others
        are ignored: a resource may claim profiles of other guides, and a claim of a US Core profile names no
        version, so data that a sender made for another US Core release is not refused by this one's."""
        meta = resource.get("meta") if isinstance(resource, dict) else None
        claimed = meta.get("profile") if isinstance(meta, dict) else None
        out: list[Issue] = []
        for url in claimed if isinstance(claimed, list) else ():
            if isinstance(url, str) and _without_version(url) in self._profiles:
                out += [i for i in self.check(resource, url) if i not in out]
        return out

    def value_set(self, url: str) -> Codes | None:
        """The codes of a ValueSet of the terminology folder or of R4 (for R4 required bindings); None if
        unknown."""
        url = _without_version(url)
        if url not in self._expanded:
            self._expanded[url] = None  # a value set that includes itself expands to nothing more
            self._expanded[url] = self._expand(url)
        return self._expanded[url]

    def _expand(self, url: str) -> Codes | None:
        vs = self._value_sets.get(url)
        if vs is None:
            r4 = validation._value_set(url)  # the vendored R4 value sets of the base validation
            return None if r4 is None else dict(r4)
        out: Codes = {}
        contains = (vs.get("expansion") or {}).get("contains")
        if contains:
            _add_contains(out, contains)
            return out
        for include in (vs.get("compose") or {}).get("include", []):
            for nested in include.get("valueSet", []):
                codes = self.value_set(nested)
                if codes is None:
                    return None
                for system, values in codes.items():
                    _add(out, system, values)
            system = include.get("system")
            if not system:
                continue
            if include.get("concept"):
                _add(out, system, frozenset(c["code"] for c in include["concept"] if "code" in c))
            elif include.get("filter"):
                _add(out, system, None)
            else:
                cs = self._code_systems.get(system)
                _add(out, system, frozenset(_concept_codes(cs.get("concept", []))) if cs else None)
        for exclude in (vs.get("compose") or {}).get("exclude", []):
            system = exclude.get("system")
            known = out.get(system) if system else None
            if known is not None and exclude.get("concept"):
                out[system] = known - {c.get("code") for c in exclude["concept"]}
        return out


def _read(directory: Path) -> list[dict[str, Any]]:
    if not directory.is_dir():
        return []
    return [json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))]


def _concept_codes(concepts: list[dict[str, Any]]) -> list[str]:
    codes: list[str] = []
    for concept in concepts:
        codes.append(concept["code"])
        codes += _concept_codes(concept.get("concept", []))
    return codes


def _add_contains(out: Codes, contains: list[dict[str, Any]]) -> None:
    for item in contains:
        if item.get("system") and item.get("code"):
            _add(out, item["system"], frozenset({item["code"]}))
        _add_contains(out, item.get("contains", []))


def _add(out: Codes, system: str, codes: frozenset[str] | None) -> None:
    if system in out:
        known = out[system]
        out[system] = None if known is None or codes is None else known | codes
    else:
        out[system] = codes


def _matches(value: Any, pattern: Any) -> bool:
    """https://hl7.org/fhir/R4/elementdefinition-definitions.html#ElementDefinition.pattern_x_: every property of
    the pattern is in the value; every item of a pattern array matches some item of the value's array."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(k in value and _matches(value[k], p) for k, p in pattern.items())
    if isinstance(pattern, list):
        return isinstance(value, list) and all(any(_matches(v, p) for v in value) for p in pattern)
    return bool(value == pattern and type(value) is type(pattern))


def _show(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text if len(text) <= 200 else text[:197] + "..."


class _Checker:
    """One walk of a resource along a profile's tree, collecting issues."""

    def __init__(self, registry: ProfileRegistry, profile: str, out: list[Issue]) -> None:
        self.registry = registry
        self.profile = profile
        self.out = out

    def add(self, code: str, diagnostics: str, expression: str, severity: str = "error") -> None:
        self.out.append(Issue(code, f"{expression}: {diagnostics} (profile {self.profile})", expression, severity))

    def children(self, obj: dict[str, Any], node: _Node, path: str) -> None:
        for child in node.children:
            self.element(obj, child, path)

    def element(self, obj: dict[str, Any], node: _Node, path: str) -> None:
        items: list[tuple[str, Any]] = []
        for name in node.json_names():
            value = obj.get(name)
            if isinstance(value, list):
                items += [(name, v) for v in value]
            elif value is not None or isinstance(obj.get("_" + name), dict | list):
                items.append((name, value))
        if node.name.endswith("[x]"):
            for key in obj:
                prefix = node.name[:-3]
                if key.startswith(prefix) and key[len(prefix) : len(prefix) + 1].isupper():
                    if key not in node.json_names():
                        allowed = ", ".join(node.json_names())
                        self.add(
                            "structure", f"{key} is not allowed here; the profile allows {allowed}", path + "." + key
                        )
        shown = f"{path}.{items[0][0] if items else node.name.removesuffix('[x]')}"
        count = len(items)
        if count < node.min:
            self.add("required", f"minimum required = {node.min}, but only found {count}", shown)
        if node.max is not None and count > node.max:
            what = "not allowed" if node.max == 0 else f"maximum allowed = {node.max}, but found {count}"
            self.add("structure", what, shown)
        for i, (name, value) in enumerate(items):
            if value is not None:
                self.value(value, name, node, f"{path}.{name}[{i}]" if node.repeats else f"{path}.{name}")
        if node.slices:
            self.slices(items, node, path)

    def value(self, value: Any, name: str, node: _Node, path: str) -> None:
        if node.fixed is not None and value != node.fixed:
            self.add("value", f"must be exactly {_show(node.fixed)}, not {_show(value)}", path)
        if node.pattern is not None and not _matches(value, node.pattern):
            self.add("value", f"must match the pattern {_show(node.pattern)}, but is {_show(value)}", path)
        self.bounds(value, node, path)
        type_code = next((t for t in node.types if name in (node.name, node.name[:-3] + _cap(t))), "")
        if node.binding is not None:
            self.binding(value, type_code, node.binding, node.profiled, path)
        if node.targets is not None and isinstance(value, dict):
            self.target(value, node.targets, path)
        self.invariants(value, node, type_code, path)
        if isinstance(value, dict):
            self.children(value, node, path)

    def invariants(
        self, value: Any, node: _Node, type_code: str, path: str, skip: frozenset[str] = frozenset()
    ) -> None:
        """The node's invariants (but ``skip``), evaluated with ``value`` as their context."""
        for invariant in node.invariants:
            if invariant.key in skip:
                continue
            if type_code in ("", "BackboneElement", "Element"):  # typed by the element's path: Patient.contact
                type_code = ".".join(part.split(":", 1)[0] for part in node.element_id.split("."))
            try:
                result = _evaluate(invariant.expression, value, type_code)
            except Exception as exc:  # fhirpathpy refuses a function or construct it does not implement
                self.add("not-supported", f"invariant {invariant.key} could not be evaluated: {exc}", path, "warning")
                continue
            if result != [True]:
                severity = "error" if invariant.severity == "error" else "warning"
                self.add("invariant", f"{invariant.human} ({invariant.key})", path, severity)

    def bounds(self, value: Any, node: _Node, path: str) -> None:
        """minValue[x] and maxValue[x] of numbers and quantities (the project sets no date bounds)."""
        number = value.get("value") if isinstance(value, dict) else value
        if isinstance(number, bool) or not isinstance(number, int | float):
            return
        for limit, below in ((node.min_value, True), (node.max_value, False)):
            bound = limit.get("value") if isinstance(limit, dict) else limit
            if isinstance(bound, bool) or not isinstance(bound, int | float):
                continue
            if (number < bound) if below else (number > bound):
                word = "at least" if below else "at most"
                self.add("value", f"must be {word} {bound}, not {number}", path)

    def binding(self, value: Any, type_code: str, binding: tuple[str, str], profiled: bool, path: str) -> None:
        strength, url = binding
        codes = self.registry.value_set(url)
        if codes is None:
            if profiled and strength == "required":
                self.add(
                    "not-supported", f"value set {url} is not available; the binding is not checked", path, "warning"
                )
            return
        severity = "error" if strength == "required" else "warning"
        if type_code in ("code", "string", "uri"):
            if isinstance(value, str) and not any(c is None or value in c for c in codes.values()):
                self.add(
                    "code-invalid",
                    f"'{value}' is not in the {strength} value set {url}{_listed(codes)}",
                    path,
                    severity,
                )
            return
        if type_code == "CodeableConcept" and isinstance(value, dict):
            codings = [c for c in value.get("coding") or [] if isinstance(c, dict)]
        elif type_code in ("Coding", "Quantity") and isinstance(value, dict):
            codings = [value]
        else:
            return
        if not any(_in(c, codes) for c in codings):
            found = ", ".join(f"{c.get('system')}#{c.get('code')}" for c in codings) or "no coding"
            self.add(
                "code-invalid", f"{found}: no code of the {strength} value set {url}{_listed(codes)}", path, severity
            )

    def target(self, reference: dict[str, Any], targets: frozenset[str], path: str) -> None:
        literal = reference.get("reference")
        if not isinstance(literal, str) or literal.startswith(("#", "urn:")):
            return
        parts = literal.split("/")
        target = parts[-4] if len(parts) >= 4 and parts[-2] == "_history" else parts[-2] if len(parts) >= 2 else None
        if target is not None and target not in targets:
            allowed = "|".join(sorted(targets))
            self.add("value", f"must refer to {allowed}, not {target}", path + ".reference")

    def slices(self, items: list[tuple[str, Any]], node: _Node, path: str) -> None:
        array = f"{path}.{node.name}"
        for slice_node in node.slices:
            matched = [(i, v) for i, (_, v) in enumerate(items) if self.in_slice(v, slice_node, node.slicing or [])]
            if slice_node.extension_url is not None:
                where = f"{array}('{slice_node.extension_url}')"
                what = f"extension {slice_node.extension_url}"
            else:
                where = array
                what = f"slice '{slice_node.element_id.rsplit(':', 1)[-1]}' ({self.describe(slice_node)})"
            if len(matched) < slice_node.min:
                self.add("required", f"{what} is required (min {slice_node.min}), found {len(matched)}", where)
            if slice_node.max is not None and len(matched) > slice_node.max:
                self.add("structure", f"{what} may appear at most {slice_node.max} times, found {len(matched)}", where)
            inherited = frozenset(i.key for i in node.invariants)  # evaluated on every item already
            for k, (i, value) in enumerate(matched):
                if slice_node.extension_url is None:
                    item_path = f"{array}[{i}]" if node.repeats else array
                else:
                    item_path = where if len(matched) == 1 else f"{where}[{k}]"
                self.slice_item(value, slice_node, item_path, inherited)

    def slice_item(self, value: Any, slice_node: _Node, path: str, inherited: frozenset[str]) -> None:
        type_code = slice_node.types[0] if slice_node.types else ""
        if slice_node.binding is not None:
            self.binding(value, type_code, slice_node.binding, slice_node.profiled, path)
        self.invariants(value, slice_node, type_code, path, inherited)
        if isinstance(value, dict):
            self.children(value, slice_node, path)
            definition = self.registry._extensions.get(slice_node.extension_url or "")
            if definition is not None:
                checker = _Checker(self.registry, definition.url, self.out)
                checker.invariants(value, definition.root, "Extension", path)
                checker.children(value, definition.root, path)

    def in_slice(self, value: Any, slice_node: _Node, discriminators: list[dict[str, str]]) -> bool:
        for discriminator in discriminators or [{"type": "pattern", "path": "$this"}]:
            disc_path = discriminator.get("path", "$this")
            if disc_path == "url" and slice_node.extension_url is not None and slice_node.child("url") is None:
                if not (isinstance(value, dict) and value.get("url") == slice_node.extension_url):
                    return False
                continue
            target: _Node | None = slice_node
            values = [value]
            for step in [] if disc_path == "$this" else disc_path.split("."):
                target = target.child(step) if target is not None else None
                values = [item for v in values for item in _step(v, step)]
            if target is not None and target.fixed is None and target.pattern is None and target.binding is not None:
                # a slice of a value set rather than of a value (US Core: "Required Bindings When Slicing by
                # Value Sets"): an item is in it if its code is in the value set
                if not any(self.in_value_set(v, target.binding[1]) for v in values):
                    return False
                continue
            if target is None or (target.fixed is None and target.pattern is None):
                return False
            if target.fixed is not None and not any(v == target.fixed for v in values):
                return False
            if target.pattern is not None and not any(_matches(v, target.pattern) for v in values):
                return False
        return True

    def in_value_set(self, value: Any, url: str) -> bool:
        """Whether a code, Coding or CodeableConcept is in the value set (one that cannot be expanded holds
        everything)."""
        codes = self.registry.value_set(url)
        if codes is None:
            return True
        if isinstance(value, str):
            return any(c is None or value in c for c in codes.values())
        if not isinstance(value, dict):
            return False
        codings = value.get("coding") if "coding" in value else [value]
        return any(isinstance(c, dict) and _in(c, codes) for c in codings or ())

    def describe(self, slice_node: _Node) -> str:
        shown = slice_node.pattern if slice_node.pattern is not None else slice_node.fixed
        if shown is not None:
            return f"matching {_show(shown)}"
        if slice_node.binding is not None and not slice_node.children:
            return f"with a code of {slice_node.binding[1]}"
        parts = [f"{c.name} {_show(c.fixed if c.fixed is not None else c.pattern)}" for c in slice_node.children]
        return "with " + ", ".join(p for p in parts if not p.endswith(" null"))


def _step(value: Any, name: str) -> list[Any]:
    found = value.get(name) if isinstance(value, dict) else None
    return found if isinstance(found, list) else [] if found is None else [found]


def _in(coding: dict[str, Any], codes: Codes) -> bool:
    system, code = coding.get("system"), coding.get("code")
    if not isinstance(system, str) or system not in codes:
        return False
    allowed = codes[system]
    return allowed is None or code in allowed


def _listed(codes: Codes) -> str:
    listed = sorted(f"{s}#{c}" for s, cs in codes.items() if cs is not None for c in cs)
    if not listed or len(listed) > MAX_LISTED_CODES:
        return ""
    return " (allowed: " + ", ".join(listed) + ")"
