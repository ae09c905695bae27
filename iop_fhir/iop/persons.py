"""One Patient per person: which Patient resource an enrollment's patient is.

The matching rule: a new enrollment's patient is the Patient that already carries one of the enrollment's patient
identifiers (system and value, exactly): the Patient an inbound referral brought (the referring unit's MRN) or the
one an earlier enrollment of the same person made (a readmission). The enrollment then writes its own version of
that Patient (demographics as the program recorded them), keeping the identifiers the Patient already had. With no
such Patient, the enrollment's own Patient is made (its id follows from the enrollment, mapping/ids.py).

- Same identifier, a different birth date: 409, naming the Patient and both dates, and nothing is written; the
  identifiers are wrong on one side, and merging two people's records is what Part 2 and patient safety forbid.
- Identifiers that match two or more Patients: 409 naming them (they are not merged here).
- An enrollment keeps the Patient it was given when it is changed later (PUT), whatever its identifiers become.
- A retracted enrollment leaves its Patient active while another enrollment that is not retracted uses it.

The mappings name the patient of an enrollment by the id the enrollment's own Patient would have; ``rehome``
rewrites those references (and that Patient's id) to the person's Patient before anything is written.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import orjson

from iop_fhir.errors import Conflict, Issue
from iop_fhir.mapping import ids
from iop_fhir.mapping.engine import Produced
from iop_fhir.r4 import search
from iop_fhir.store.base import StoredRecord, WriteTx

_MOST = 10  # Patients looked at per identifier: more than one is already a conflict


def own_reference(enrollment_id: str) -> str:
    """The Patient an enrollment makes when its person has none yet."""
    return f"Patient/{ids.resource_id('enrollment', enrollment_id, 'patient')}"


def of(enrollment: StoredRecord) -> str:
    """The Patient of a stored enrollment (its own, for one stored before people were matched)."""
    for entry in enrollment.resources:
        if entry.get("role") == "patient":
            return str(entry["reference"])
    return own_reference(enrollment.id)


def person_for(tx: WriteTx, enrollment_id: str, record: dict[str, Any], existing: StoredRecord | None) -> str:
    """The Patient reference of the enrollment being saved (module docstring); a Conflict when the identifiers
    name another person or several."""
    if existing is not None and any(e.get("role") == "patient" for e in existing.resources):
        return of(existing)
    patient = record.get("patient") or {}
    found: dict[str, dict[str, Any]] = {}
    for identifier in patient.get("identifiers") or ():
        system, value = identifier.get("system"), identifier.get("value")
        if not system or not value:
            continue
        request = search.parse("Patient", [("identifier", search.token_value(system, value)), ("_count", "10")])
        for stored in tx.search(request).matches[:_MOST]:
            if stored.content is not None and not stored.deleted:
                found.setdefault(stored.res_id, orjson.loads(stored.content))
    if not found:
        return own_reference(enrollment_id)
    if len(found) > 1:
        names = ", ".join(f"Patient/{res_id}" for res_id in sorted(found))
        text = f"the patient's identifiers match several Patients ({names}); correct the identifiers or the Patients"
        raise Conflict(issues=[Issue("conflict", text, "patient.identifiers")])
    [(res_id, resource)] = found.items()
    birth_date = patient.get("birth_date")
    if birth_date and resource.get("birthDate") and resource["birthDate"] != birth_date:
        text = (
            f"Patient/{res_id} has the same identifier and was born on {resource['birthDate']}, but this enrollment "
            f"says {birth_date}: the same identifier cannot name two people; correct one of them"
        )
        raise Conflict(issues=[Issue("conflict", text, "patient.birth_date")])
    return f"Patient/{res_id}"


def aliases(enrollments: Iterable[tuple[str, str]]) -> dict[str, str]:
    """(enrollment id, its Patient reference) → {the reference the mappings give: the person's}, where they differ."""
    found: dict[str, str] = {}
    for enrollment_id, person in enrollments:
        own = own_reference(enrollment_id)
        if person != own:
            found[own] = person
    return found


def rehome(produced: Produced, moved: dict[str, str]) -> Produced:
    """The resource with each patient reference (and, for the enrollment's Patient, its id) moved to the person's
    Patient."""
    resource = _moved(produced.resource, moved)
    if produced.reference in moved:
        resource["id"] = moved[produced.reference].split("/", 1)[1]
    return Produced(produced.role, resource, produced.shared)


def keep_identifiers(resource: dict[str, Any], current: Any) -> dict[str, Any]:
    """A person's Patient as an enrollment writes it, with the identifiers its current version has that this one
    lacks (the referring unit's MRN, an earlier enrollment's)."""
    if current is None or current.deleted or current.content is None:
        return resource
    before = orjson.loads(current.content).get("identifier") or []
    now = resource.get("identifier") or []
    seen = {(i.get("system"), i.get("value")) for i in now}
    kept = [copy.deepcopy(i) for i in before if (i.get("system"), i.get("value")) not in seen]
    return {**resource, "identifier": [*now, *kept]} if kept else resource


def shared_with_another(tx: WriteTx, enrollment_id: str, patient: str) -> bool:
    """Whether an enrollment other than this one, not retracted, has ``patient`` (its EpisodeOfCare is not
    entered-in-error)."""
    request = search.parse("EpisodeOfCare", [("patient", patient), ("_count", "100")])
    own = ids.identifier_value("enrollment", enrollment_id, "episode")
    for stored in tx.search(request).matches:
        if stored.content is None or stored.deleted:
            continue
        episode = orjson.loads(stored.content)
        if episode.get("status") == "entered-in-error":
            continue
        values = {i.get("value") for i in episode.get("identifier") or () if i.get("system") == ids.RECORD_SYSTEM}
        if own not in values:
            return True
    return False


def _moved(node: Any, moved: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {key: _moved(value, moved) for key, value in node.items()}
        reference = out.get("reference")
        if isinstance(reference, str) and reference in moved:
            out["reference"] = moved[reference]
        return out
    if isinstance(node, list):
        return [_moved(item, moved) for item in node]
    return node
