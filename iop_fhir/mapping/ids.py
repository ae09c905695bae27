"""Deterministic ids: the same record, role and key always name the same FHIR resource."""

from __future__ import annotations

import uuid
from functools import lru_cache

# Fixed for the life of the project: changing it would re-key every stored resource.
NAMESPACE = uuid.UUID("5b0f7c52-3f3e-5a7d-9a39-6f2d1e0c4a11")
CANONICAL = "https://iop-fhir.org/fhir"
RECORD_SYSTEM = f"{CANONICAL}/sid/iop-record"


def record_id(kind: str, natural_key: list[str]) -> str:
    """The id of an IOP record, from the fields that identify it in the program (its natural key)."""
    return str(uuid.uuid5(NAMESPACE, "|".join([kind, *natural_key])))


@lru_cache(maxsize=65536)
def resource_id(kind: str, rid: str, role: str, key: str | None = None) -> str:
    return str(uuid.uuid5(NAMESPACE, identifier_value(kind, rid, role, key)))


def shared_id(res_type: str, role: str, values: list[str]) -> str:
    """The id of a resource shared by many records (a practitioner named by NPI, a partner organisation)."""
    return str(uuid.uuid5(NAMESPACE, "|".join(["shared", res_type, role, *values])))


def identifier_value(kind: str, rid: str, role: str, key: str | None = None) -> str:
    return f"{kind}/{rid}/{role}" + (f"/{key}" if key is not None else "")


def parse_identifier_value(value: str) -> tuple[str, str, str, str | None] | None:
    parts = value.split("/", 3)
    if len(parts) < 3:
        return None
    return parts[0], parts[1], parts[2], parts[3] if len(parts) == 4 else None
