"""Loads mappings/<kind>.yaml into MappingSpec objects and checks their shape before anything is mapped."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

RESOURCE_KEYS = {
    "id",
    "role",
    "type",
    "profile",
    "us_core",
    "each",
    "as",
    "key",
    "when",
    "shared",
    "template",
    "retract",
}
UPDATE_KEYS = {"record", "role", "each", "as", "key", "merge", "when"}
EXPAND_KEYS = {"kind", "each", "as", "key", "record", "add"}
SPEC_KEYS = {
    "kind",
    "title",
    "inputs",
    "key",
    "enrollment",
    "during",
    "references",
    "codes",
    "private",
    "derive",
    "tables",
    "resources",
    "updates",
    "normalisations",
    "id",
    "expand",
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
    us_core: str | None = None  # the US Core profile the project profile derives from, claimed with it


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
class ExpandSpec:
    """A record that stands for several records of another kind, one per element of a list (a group session is one
    session per attendee): each element's record is built from `record` (field: $expression) and mapped with that
    kind's mapping, and `add` is merged into the resources of the named roles (the group's identifier on each
    attendee's Encounter)."""

    kind: str
    each: str
    key: str
    record: dict[str, str]
    as_: str = "item"
    add: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class DuringSpec:
    start: str  # a field path (a.b), its value an instant or date
    end: str | None = None  # for a span: the field of its end (absent: open)


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
    expand: ExpandSpec | None = None
    # When the record happened, which must fall within its enrollment (admission to discharge): the field of an
    # instant or date (a session's start), or of the start and end of a span that must overlap it (a medication).
    during: DuringSpec | None = None
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
                us_core=raw.get("us_core"),
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
        expand=_expand(data.get("expand"), source),
        during=_during(data.get("during"), source),
        source=source,
    )


def _during(raw: Any, source: str) -> DuringSpec | None:
    """``during: $start`` (a point) or ``during: {start: $start, end: $end}`` (a span)."""
    if raw is None:
        return None
    if isinstance(raw, str) and raw.startswith("$"):
        return DuringSpec(raw[1:])
    if isinstance(raw, dict) and set(raw) <= {"start", "end"} and str(raw.get("start", "")).startswith("$"):
        end = raw.get("end")
        if end is not None and not str(end).startswith("$"):
            raise SpecError(f"{source}: during.end must be a $field")
        return DuringSpec(raw["start"][1:], end[1:] if end is not None else None)
    raise SpecError(f"{source}: during must be a $field or {{start: $field, end: $field}}")


def _expand(raw: Any, source: str) -> ExpandSpec | None:
    if raw is None:
        return None
    where = f"{source}: expand"
    if not isinstance(raw, dict):
        raise SpecError(f"{where} must be a mapping")
    _check_keys(where, raw, EXPAND_KEYS)
    for required in ("kind", "each", "key", "record"):
        if required not in raw:
            raise SpecError(f"{where}: '{required}' is required")
    record = raw["record"]
    # Plain field expressions only: an issue about an element's record is reported at the field it came from.
    if not isinstance(record, dict) or not all(isinstance(v, str) and v.startswith("$") for v in record.values()):
        raise SpecError(f"{where}: record must map each field to a $expression")
    return ExpandSpec(
        kind=raw["kind"],
        each=raw["each"],
        key=raw["key"],
        record=record,
        as_=raw.get("as", "item"),
        add=raw.get("add") or {},
    )


def _check_expansions(specs: dict[str, MappingSpec]) -> None:
    for spec in specs.values():
        if spec.expand is None:
            continue
        target = specs.get(spec.expand.kind)
        if target is None or target.expand is not None:
            raise SpecError(
                f"{spec.source}: expand.kind '{spec.expand.kind}' must be a kind mapped by its own resources"
            )
        roles = {r.role for r in target.resources}
        clash = sorted(roles & {r.role for r in spec.resources})
        if clash:
            raise SpecError(f"{spec.source}: roles {', '.join(clash)} are also roles of {target.kind}")
        unknown = sorted(set(spec.expand.add) - roles)
        if unknown:
            raise SpecError(f"{spec.source}: expand.add names roles {target.kind} does not have: {', '.join(unknown)}")


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
    _check_expansions(specs)
    return specs
