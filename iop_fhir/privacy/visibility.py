"""What Part 2 visibility needs to know of one stored version: the Patients it belongs to and whether it carries a
protected label or the counseling-note label. The store keeps these facts beside every version (resource_history,
version_patients), so that history, vread and the read of a deletion decide visibility on the version itself, with
the same rule a search applies to the current version through its index (privacy/restriction.py)."""

from __future__ import annotations

from typing import Any

from iop_fhir.privacy.restriction import NOTE_LABELS, PROTECTED_LABELS
from iop_fhir.r4 import indexing
from iop_fhir.r4.indexing import IndexRows
from iop_fhir.store.base import VersionFacts


def facts_of(res_type: str, res_id: str, index: IndexRows) -> VersionFacts:
    """The facts of a version from its search index: a resource belongs to every Patient it refers to through an
    indexed reference (None for a Patient reference that names no local id), and a Patient to itself."""
    patients: set[str | None] = {res_id} if res_type == "Patient" else set()
    patients.update(row.get("target_id") for row in index.get("reference", ()) if row.get("target_type") == "Patient")
    labels = {(row.get("system"), row.get("code")) for row in index.get("token", ()) if row.get("param") == "_security"}
    return VersionFacts(
        patients=tuple(sorted(patients, key=lambda p: (p is None, p or ""))),
        protected=bool(labels & PROTECTED_LABELS),
        note=bool(labels & NOTE_LABELS),
    )


def version_facts(res_type: str, res_id: str, resource: dict[str, Any]) -> VersionFacts:
    """The facts of a version from its JSON (for versions stored before the facts were kept)."""
    return facts_of(res_type, res_id, indexing.extract(resource))
