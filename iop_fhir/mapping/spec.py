"""Loads mappings/<kind>.yaml into MappingSpec objects and checks their shape before anything is mapped."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

RESOURCE_KEYS = {"id", "role", "type", "profile", "each", "as", "key", "when", "shared", "template", "retract"}
UPDATE_KEYS = {"record", "role", "each", "as", "key", "merge", "when"}
SPEC_KEYS = {
    "kind",
    "title",
    "inputs",
    "key",
    "enrollment",
    "references",
    "codes",
    "private",
    "derive",
    "tables",
    "resources",
    "updates",
    "normalisations",
    "id",
}


class SpecError(ValueError):
    """A mapping file that cannot be used; the message names the file and the place."""


@dataclass(frozen=True)
class ResourceSpec:
    role: str
    type: str
    profile: str
    template: dict[str, Any]
    each: str | None = None
    as_: str = "item"
    key: Any = None
    when: Any = None
    shared: list[Any] | None = None
    retract: dict[str, Any] | None = None
    id: str | None = None  # the resource id is this field (a partner's Organization is named by the partner id)


@dataclass(frozen=True)
class UpdateSpec:
    """Changes this record makes to the resources of another record of the same enrollment (a discharge closes
    the enrollment's episode and the plan's goals)."""

    record: str
    role: str
    merge: dict[str, Any]
    each: str | None = None
    as_: str = "item"
    key: Any = None
    when: Any = None


@dataclass(frozen=True)
class MappingSpec:
    kind: str
    title: str
    inputs: dict[str, str]
    key: list[Any]
    resources: list[ResourceSpec]
    updates: list[UpdateSpec] = field(default_factory=list)
    enrollment: str | None = None
    references: dict[str, str] = field(default_factory=dict)
    codes: dict[str, str] = field(default_factory=dict)
    private: list[str] = field(default_factory=list)
    derive: list[str] = field(default_factory=list)
    tables: dict[str, Any] = field(default_factory=dict)
    normalisations: list[str] = field(default_factory=list)
    id: str | None = None  # a field whose value is the record's id (partners), instead of the natural key
    source: str = ""

    def resource(self, role: str) -> ResourceSpec:
        for spec in self.resources:
            if spec.role == role:
                return spec
        raise KeyError(role)


def _check_keys(where: str, data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def parse(data: Any, source: str) -> MappingSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a mapping file must be a YAML mapping")
    _check_keys(source, data, SPEC_KEYS)
    for required in ("kind", "inputs", "key", "resources"):
        if required not in data:
            raise SpecError(f"{source}: '{required}' is required")
    resources = []
    for n, raw in enumerate(data["resources"]):
        where = f"{source}: resources[{n}]"
        if not isinstance(raw, dict):
            raise SpecError(f"{where} must be a mapping")
        _check_keys(where, raw, RESOURCE_KEYS)
        for required in ("role", "type", "profile", "template"):
            if required not in raw:
                raise SpecError(f"{where}: '{required}' is required")
        resources.append(
            ResourceSpec(
                role=raw["role"],
                type=raw["type"],
                profile=raw["profile"],
                template=raw["template"],
                each=raw.get("each"),
                as_=raw.get("as", "item"),
                key=raw.get("key"),
                when=raw.get("when"),
                shared=raw.get("shared"),
                retract=raw.get("retract"),
                id=raw.get("id"),
            )
        )
    roles = [r.role for r in resources]
    if len(roles) != len(set(roles)):
        raise SpecError(f"{source}: roles must be unique, got {roles}")
    updates = []
    for n, raw in enumerate(data.get("updates") or []):
        where = f"{source}: updates[{n}]"
        _check_keys(where, raw, UPDATE_KEYS)
        updates.append(
            UpdateSpec(
                record=raw["record"],
                role=raw["role"],
                merge=raw["merge"],
                each=raw.get("each"),
                as_=raw.get("as", "item"),
                key=raw.get("key"),
                when=raw.get("when"),
            )
        )
    return MappingSpec(
        kind=data["kind"],
        title=str(data.get("title") or data["kind"]),
        inputs=data["inputs"],
        key=list(data["key"]),
        resources=resources,
        updates=updates,
        enrollment=data.get("enrollment"),
        references=data.get("references") or {},
        codes=data.get("codes") or {},
        private=data.get("private") or [],
        derive=data.get("derive") or [],
        tables=data.get("tables") or {},
        normalisations=data.get("normalisations") or [],
        id=data.get("id"),
        source=source,
    )


@lru_cache(maxsize=8)
def load_all(directory: Path) -> dict[str, MappingSpec]:
    """Every mappings/<kind>.yaml, by kind."""
    specs: dict[str, MappingSpec] = {}
    for path in sorted(directory.glob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise SpecError(f"{path.name}: not valid YAML: {error}") from error
        spec = parse(data, path.name)
        if spec.kind in specs:
            raise SpecError(f"{path.name}: kind '{spec.kind}' is defined twice")
        specs[spec.kind] = spec
    return specs
