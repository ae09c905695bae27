"""Terminology lookup: the IOP vocabularies (CodeSystem iop-<v>) and their ConceptMaps to FHIR codings, both ways.

Loaded from mappings/terminology/*.json (one FHIR resource per file); see the Terminology conventions of the design.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iop_fhir.mapping.ids import CANONICAL

CODESYSTEM_PREFIX = f"{CANONICAL}/CodeSystem/iop-"
CONCEPTMAP_PREFIX = f"{CANONICAL}/ConceptMap/iop-"
LOCAL_CONCEPTS = f"{CANONICAL}/CodeSystem/iop-concepts"
_CONFORMANCE_TYPES = {"CodeSystem", "ConceptMap", "ValueSet"}
# A target that means the same as the IOP code wins a reverse lookup over a broader or looser one.
_EXACT = {"equal", "equivalent"}


@dataclass(frozen=True)
class _Target:
    coding: dict[str, str]
    depends: tuple[tuple[str, str], ...]

    def applies(self, depends: Mapping[str, str] | None) -> bool:
        return all(depends is not None and depends.get(prop) == value for prop, value in self.depends)


@dataclass
class _Vocabulary:
    codesystem: dict[str, Any]
    order: list[str]
    concepts: dict[str, dict[str, Any]]
    forward: dict[str, list[_Target]]
    # (system, code) -> (rank, IOP code); rank 0 = only this IOP code maps there, 1 = exact among several, 2 = other.
    backward: dict[tuple[str, str], tuple[int, str]]


class Terminology:
    """The loaded terminology folder. Lookups are dictionary reads built once at load."""

    def __init__(self, resources: list[dict[str, Any]], vocabularies: dict[str, _Vocabulary]) -> None:
        self._resources = resources
        self._vocabularies = vocabularies

    @classmethod
    def load(cls, directory: Path) -> Terminology:
        resources: list[dict[str, Any]] = []
        sources: dict[int, Path] = {}
        for path in sorted(Path(directory).glob("*.json")):
            try:
                resource = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{path.name}: not readable JSON: {exc}") from exc
            if not isinstance(resource, dict) or resource.get("resourceType") not in _CONFORMANCE_TYPES:
                raise ValueError(f"{path.name}: not a CodeSystem, ConceptMap or ValueSet")
            if not isinstance(resource.get("url"), str) or not isinstance(resource.get("id"), str):
                raise ValueError(f"{path.name}: a conformance resource needs an id and a url")
            expected = f"{resource['resourceType']}-{resource['id']}.json"
            if path.name != expected:
                raise ValueError(f"{path.name}: holds {resource['resourceType']}/{resource['id']}, expected {expected}")
            sources[id(resource)] = path
            resources.append(resource)

        vocabularies: dict[str, _Vocabulary] = {}
        for resource in resources:
            if resource["resourceType"] == "CodeSystem" and _is_vocabulary(resource["url"]):
                vocabulary = resource["url"].removeprefix(CODESYSTEM_PREFIX)
                vocabularies[vocabulary] = _read_codesystem(resource, sources[id(resource)])
        for resource in resources:
            if resource["resourceType"] == "ConceptMap" and resource["url"].startswith(CONCEPTMAP_PREFIX):
                vocabulary = resource["url"].removeprefix(CONCEPTMAP_PREFIX)
                name = sources[id(resource)].name
                if vocabulary not in vocabularies:
                    raise ValueError(f"{name}: no CodeSystem iop-{vocabulary} for this ConceptMap")
                _read_conceptmap(resource, vocabulary, vocabularies[vocabulary], name)
        return cls(resources, vocabularies)

    def resources(self) -> list[dict[str, Any]]:
        return list(self._resources)

    def vocabularies(self) -> list[str]:
        return list(self._vocabularies)

    def codes(self, vocabulary: str) -> list[str]:
        return list(self._vocabulary(vocabulary).order)

    def concept(self, vocabulary: str, code: str) -> dict[str, Any] | None:
        concept = self._vocabulary(vocabulary).concepts.get(code)
        return None if concept is None else {**concept, "properties": dict(concept["properties"])}

    def property_values(self, vocabulary: str, code: str, prop: str) -> list[Any]:
        """Every value of a property a concept may repeat (the analytes a medication explains); `concept` gives
        one value per property."""
        for concept in self._vocabulary(vocabulary).codesystem.get("concept", []):
            if concept.get("code") == code:
                return [_property_value(p) for p in concept.get("property", []) if p.get("code") == prop]
        return []

    def translate(self, vocabulary: str, code: str, depends: Mapping[str, str] | None = None) -> list[dict[str, str]]:
        targets = self._vocabulary(vocabulary).forward.get(code, [])
        return [dict(target.coding) for target in targets if target.applies(depends)]

    def reverse(self, vocabulary: str, codings: Iterable[Mapping[str, Any]]) -> str | None:
        backward = self._vocabulary(vocabulary).backward
        best: tuple[int, str] | None = None
        for coding in codings:
            found = backward.get((str(coding.get("system")), str(coding.get("code"))))
            if found is not None and (best is None or found[0] < best[0]):
                best = found
        return None if best is None else best[1]

    def system_url(self, vocabulary: str) -> str:
        return str(self._vocabulary(vocabulary).codesystem["url"])

    def _vocabulary(self, vocabulary: str) -> _Vocabulary:
        try:
            return self._vocabularies[vocabulary]
        except KeyError:
            raise KeyError(f"unknown vocabulary '{vocabulary}'") from None


def _is_vocabulary(url: str) -> bool:
    return url.startswith(CODESYSTEM_PREFIX) and url != LOCAL_CONCEPTS


def _read_codesystem(resource: dict[str, Any], path: Path) -> _Vocabulary:
    order: list[str] = []
    concepts: dict[str, dict[str, Any]] = {}
    for concept in resource.get("concept", []):
        code = concept.get("code")
        if not isinstance(code, str) or code in concepts:
            raise ValueError(f"{path.name}: concept code {code!r} is missing or repeated")
        order.append(code)
        concepts[code] = {
            "code": code,
            "display": concept.get("display"),
            "definition": concept.get("definition"),
            "properties": {p["code"]: _property_value(p) for p in concept.get("property", [])},
        }
    return _Vocabulary(resource, order, concepts, {}, {})


def _property_value(prop: Mapping[str, Any]) -> Any:
    for key, value in prop.items():
        if key.startswith("value"):
            return value
    return None


def _read_conceptmap(resource: dict[str, Any], vocabulary: str, vocab: _Vocabulary, name: str) -> None:
    source = vocab.codesystem["url"]
    candidates: dict[tuple[str, str], list[tuple[bool, str]]] = {}
    for group in resource.get("group", []):
        if group.get("source") != source:
            raise ValueError(f"{name}: group source {group.get('source')!r} is not {source}")
        system = group.get("target")
        if not isinstance(system, str):
            raise ValueError(f"{name}: a group has no target system")
        for element in group.get("element", []):
            code = element.get("code")
            if code not in vocab.concepts:
                raise ValueError(f"{name}: '{code}' is not a code of CodeSystem iop-{vocabulary}")
            for mapped in element.get("target", []):
                coding = {"system": system, "code": mapped["code"]}
                if mapped.get("display"):
                    coding["display"] = mapped["display"]
                depends = tuple((d["property"], d["value"]) for d in mapped.get("dependsOn", []))
                vocab.forward.setdefault(code, []).append(_Target(coding, depends))
                is_exact = mapped.get("equivalence") in _EXACT
                candidates.setdefault((system, mapped["code"]), []).append((is_exact, code))
    for key, codes in candidates.items():
        distinct = list(dict.fromkeys(code for _, code in codes))
        if len(distinct) == 1:
            vocab.backward[key] = (0, distinct[0])
            continue
        exact = [code for is_exact, code in codes if is_exact]
        rank, chosen = (1, exact[0]) if len(set(exact)) == 1 else (2, min(distinct, key=vocab.order.index))
        vocab.backward[key] = (rank, chosen)


@functools.lru_cache(maxsize=8)
def _load_resolved(directory: Path) -> Terminology:
    return Terminology.load(directory)


def load(directory: Path) -> Terminology:
    """The terminology of a folder, read once per process (per resolved path)."""
    return _load_resolved(Path(directory).resolve())
