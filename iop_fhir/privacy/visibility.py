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
    """The facts of a version from its search index: a resource belongs to every Patient it refers to through an
    indexed reference, and a Patient to itself. A reference that may be to a Patient but names no local one counts
    as an unknown Patient (None), which no partner is permitted: a reference typed Patient that names no local id
    (by identifier only, conditional, ``urn:uuid:``), and, in a parameter that puts the type in the Patient
    compartment, one that names no resource of a known type (untyped by identifier only, ``urn:uuid:``, another
    server's URL, a contained Patient)."""
    res_type, res_id = resource.get("resourceType"), resource.get("id")
    patients: set[str | None] = {res_id} if res_type == "Patient" and isinstance(res_id, str) else set()
    in_compartment = set(patient_compartment().get(res_type, ())) if isinstance(res_type, str) else set()
    contained = _contained_types(resource)
    for row in index.get("reference", ()):
        target, target_id = row.get("target_type"), row.get("target_id")
        if target == "Patient":
            patients.add(target_id)
        elif target is None and row.get("param") in in_compartment and _may_be_a_patient(row.get("url"), contained):
            patients.add(None)
    labels = {(row.get("system"), row.get("code")) for row in index.get("token", ()) if row.get("param") == "_security"}
    return VersionFacts(
        patients=tuple(sorted(patients, key=lambda p: (p is None, p or ""))),
        protected=bool(labels & PROTECTED_LABELS),
        note=bool(labels & NOTE_LABELS),
    )


def _contained_types(resource: dict[str, Any]) -> dict[str, Any]:
    """``#id`` of each contained resource → its resourceType."""
    found: dict[str, Any] = {}
    for item in resource.get("contained") or ():
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            found[f"#{item['id']}"] = item.get("resourceType")
    return found


def _may_be_a_patient(url: Any, contained: dict[str, Any]) -> bool:
    """Whether an untyped reference row that names no local resource may be to a Patient: a canonical or a
    reference to a contained resource that is not a Patient is not."""
    if isinstance(url, str) and url.startswith("#"):
        return url not in contained or contained[url] == "Patient"
    return True


def version_facts(resource: dict[str, Any]) -> VersionFacts:
    """The facts of a version from its JSON (for versions stored before the facts were kept)."""
    return facts_of(resource, indexing.extract(resource))
