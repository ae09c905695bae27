"""The mapping engine: IOP records to FHIR resources, driven by mappings/*.yaml; terminology lookups; deterministic ids.

``Engine.reverse`` (resources back to the record) is the mappings' test oracle: the golden tests map every case and
read it back, which proves that nothing a record says is lost on the way to FHIR. Referral intake uses it too, on
an inbound referral's Patient and Conditions read as an enrollment's: they come from another system, not from these
templates, so the reverse recovers what matches them (demographics in the record's vocabularies, diagnoses in its
systems) and exchange/referrals.py reads the rest leniently (any identifiers, the official name, other codings).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from iop_fhir.mapping.engine import Engine, Produced


@lru_cache(maxsize=4)
def load_engine(mappings_dir: Path) -> Engine:
    """The engine for a mappings folder (its YAML files and terminology/), loaded once per process."""
    from iop_fhir.mapping import spec, terminology

    return Engine(spec.load_all(mappings_dir), terminology.load(mappings_dir / "terminology"))


def to_bundle(
    kind: str, record: dict[str, Any], engine: Engine, *, context: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The FHIR resources of one record as a transaction Bundle of PUTs (replaying it never duplicates)."""
    derived = engine.prepare(kind, record, context or {})
    rid = engine.natural_key(kind, derived.record)
    produced = engine.map(kind, derived.record, rid, context)
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{p.resource['id']}" if _is_uuid(p.resource["id"]) else p.reference,
                "resource": p.resource,
                "request": {"method": "PUT", "url": p.reference},
            }
            for p in produced
        ],
    }


def _is_uuid(value: str) -> bool:
    return len(value) == 36 and value.count("-") == 4


__all__ = ["Engine", "Produced", "load_engine", "to_bundle"]
