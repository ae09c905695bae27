"""What Part 2 visibility needs to know of one stored version: the Patients it belongs to and whether it carries a
protected label or the counseling-note label. The store keeps these facts beside every version (resource_history,
version_patients), so that history, vread and the read of a deletion decide visibility on the version itself, with
the same rule a search applies to the current version through its index (privacy/restriction.py)."""

from __future__ import annotations

from typing import Any

from iop_fhir.privacy.restriction import NOTE_LABELS, PROTECTED_LABELS
from iop_fhir.r4 import indexing
from iop_fhir.r4.compartment import patient_compartment
from iop_fhir.r4.indexing import IndexRows
from iop_fhir.store.base import VersionFacts


def facts_of(resource: dict[str, Any], index: IndexRows) -> VersionFacts:
    """The facts of a version from its JSON and search index: a resource belongs to every Patient it names
    (``named_patients``), and a Patient to itself. A reference that may be to a Patient but names no local one counts
    as an unknown Patient (None), which no partner is permitted: a reference typed Patient that names no local id
    (by identifier only, conditional, ``urn:uuid:``), and, in a parameter that puts the type in the Patient
    compartment, one that names no resource of a known type (untyped by identifier only, ``urn:uuid:``, another
    server's URL, a contained Patient). A reference to a Patient that no parameter indexes counts too (in an
    extension, in a contained resource: ``named_patients``)."""
    res_type, res_id = resource.get("resourceType"), resource.get("id")
    patients: set[str | None] = {res_id} if res_type == "Patient" and isinstance(res_id, str) else set()
    patients |= named_patients(resource)  # every reference typed Patient, indexed or not
    # An untyped reference that names no local resource, where the type's Patient compartment reads, may be to a
    # Patient: unless it points to a resource held inside (a held Patient is one of named_patients already).
    in_compartment = set(patient_compartment().get(res_type, ())) if isinstance(res_type, str) else set()
    held = {f"#{item.get('id')}" for item in resource.get("contained") or () if isinstance(item, dict)}
    for row in index.get("reference", ()):
        if row.get("target_type") is None and row.get("param") in in_compartment and row.get("url") not in held:
            patients.add(None)
    labels = {(row.get("system"), row.get("code")) for row in index.get("token", ()) if row.get("param") == "_security"}
    return VersionFacts(
        patients=tuple(sorted(patients, key=lambda p: (p is None, p or ""))),
        protected=bool(labels & PROTECTED_LABELS),
        note=bool(labels & NOTE_LABELS),
    )


# The elements of a Reference (https://hl7.org/fhir/R4/references.html#Reference).
REFERENCE_KEYS = frozenset({"id", "extension", "reference", "type", "identifier", "display"})


def named_patients(resource: dict[str, Any]) -> set[str | None]:
    """The Patients a resource names anywhere in it, indexed or not (extensions, contained resources, elements no
    search parameter reads): the id of every reference to ``Patient/id`` (relative or absolute), and None (an unknown
    Patient) for a reference typed Patient that names no id and for a Patient resource held inside it."""
    found: set[str | None] = set()
    stack: list[Any] = [v for k, v in resource.items() if k != "resourceType"]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            ref = value.get("reference")
            target, target_id = indexing.split_reference(ref)[:2] if isinstance(ref, str) else (None, None)
            if target == "Patient":
                found.add(target_id)
            elif value.get("type") == "Patient" and target is None and value.keys() <= REFERENCE_KEYS:
                found.add(None)
            if value.get("resourceType") == "Patient":
                found.add(None)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return found


def version_facts(resource: dict[str, Any]) -> VersionFacts:
    """The facts of a version from its JSON (for versions stored before the facts were kept)."""
    return facts_of(resource, indexing.extract(resource))
