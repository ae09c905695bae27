"""The project's conformance resources (StructureDefinitions of ``profiles/``, CodeSystems, ValueSets and
ConceptMaps of ``mappings/terminology/``, the program's Measures of ``mappings/outcomes/`` beside it) in the store,
so /fhir serves them like any other resource."""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson

from iop_fhir.fhir.repository import Repository
from iop_fhir.r4.profiles import ProfileRegistry

TERMINOLOGY_TYPES = ("CodeSystem", "ValueSet", "ConceptMap")
MEASURE_TYPES = ("Measure",)
Signature = tuple[tuple[str, int, int], ...]


def load(profiles_dir: Path, terminology_dir: Path) -> tuple[ProfileRegistry, list[dict[str, Any]]]:
    """The profile registry and the conformance resources of the two folders. Read once per process for as
    long as the folders' files are unchanged (every app, and every test, would otherwise parse them again)."""
    profiles_dir, terminology_dir = Path(profiles_dir), Path(terminology_dir)
    signature = (
        _signature(profiles_dir)
        + _signature(profiles_dir / "us-core")
        + _signature(terminology_dir)
        + _signature(measures_dir(terminology_dir))
    )
    return _load(profiles_dir, terminology_dir, signature)


def _signature(directory: Path) -> Signature:
    if not directory.is_dir():
        return ()
    return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(directory.glob("*.json")))


@lru_cache(maxsize=8)
def _load(
    profiles_dir: Path, terminology_dir: Path, signature: Signature
) -> tuple[ProfileRegistry, list[dict[str, Any]]]:
    return ProfileRegistry.load(profiles_dir, terminology_dir), resources(profiles_dir, terminology_dir)


def measures_dir(terminology_dir: Path) -> Path:
    """The folder of the program's Measures: ``outcomes/`` beside the terminology, in the mappings folder."""
    return Path(terminology_dir).parent / "outcomes"


def resources(profiles_dir: Path, terminology_dir: Path) -> list[dict[str, Any]]:
    """The StructureDefinitions of ``profiles_dir``, the terminology of ``terminology_dir`` and the Measures beside
    it, by file name; a missing folder contributes nothing."""
    found: list[dict[str, Any]] = []
    folders: tuple[tuple[Path, tuple[str, ...]], ...] = (
        (Path(profiles_dir), ("StructureDefinition",)),
        (Path(terminology_dir), TERMINOLOGY_TYPES),
        (measures_dir(terminology_dir), MEASURE_TYPES),
    )
    for directory, types in folders:
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.json")):
            resource = json.loads(path.read_text())
            if isinstance(resource, dict) and resource.get("resourceType") in types and resource.get("id"):
                found.append(resource)
    return found


def _content(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k != "meta"}


def seed(repository: Repository, conformance: Iterable[dict[str, Any]]) -> list[str]:
    """Writes each resource whose stored current version differs from it (meta aside) as a new version of
    ``Type/id``; returns the ``Type/id`` written. Unchanged resources cost one read and are not rewritten, so
    every server start may call this."""
    pending = [r for r in conformance if _changed(repository, r, None)]
    if not pending:
        return []
    with repository.store.write() as tx:
        # Another server process may have written them meanwhile: compare again under the write lock. All the
        # reads come first, so that the writes go to the database in one batch.
        changed = [r for r in pending if _changed(repository, r, tx)]
        for resource in changed:
            repository.update_in(tx, resource["resourceType"], resource["id"], resource)
    return [f"{r['resourceType']}/{r['id']}" for r in changed]


def _changed(repository: Repository, resource: dict[str, Any], tx: Any) -> bool:
    res_type, res_id = resource["resourceType"], resource["id"]
    current = tx.current(res_type, res_id) if tx is not None else repository.store.read(res_type, res_id)
    if current is None or current.deleted or current.content is None:
        return True
    stored: dict[str, Any] = orjson.loads(current.content)
    return _content(stored) != _content(resource)
