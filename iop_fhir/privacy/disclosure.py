"""Part 2 disclosure to a partner: which patients' records a recipient may see now, for a purpose, under the patients'
stored FHIR Consents (decided by consent.decide, the same rule the exchange applies to pushes). TERMINOLOGY.md §6."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator, Mapping
from datetime import date
from typing import Any
from weakref import WeakKeyDictionary

import orjson

from iop_fhir.mapping.engine import PART2_LABELS
from iop_fhir.privacy import consent
from iop_fhir.privacy.restriction import Restriction
from iop_fhir.r4 import search
from iop_fhir.store.base import ResourceStore

PAGE = 1000
# 42 CFR §2.32 Statement 1 (TERMINOLOGY.md §6.1); the full notice accompanies every disclosure.
REDISCLOSURE_NOTICE = (
    "This record which has been disclosed to you is protected by Federal confidentiality rules (42 CFR part 2). "
    "These rules prohibit you from using or disclosing this record, or testimony that describes the information "
    "contained in this record, in any civil, criminal, administrative, or legislative proceedings by any Federal, "
    "State, or local authority, against the patient, unless authorized by the consent of the patient, except as "
    "provided at 42 CFR 2.12(c)(5) or as authorized by a court in accordance with 42 CFR 2.64 or 2.65. In addition, "
    "the Part 2 rules prohibit you from using or disclosing this record, or testimony that describes the "
    "information contained in this record, to investigate or prosecute the patient or a Part 2 program, except as "
    "authorized by a court in accordance with 42 CFR 2.66 or 2.67."
)
MARK_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
DS4P_DISPLAY = "http://hl7.org/fhir/uv/security-label-ds4p/StructureDefinition/display"
# What every record of the program carries; a resource without labels is judged as if it had them: that a patient's
# data is held by an addiction treatment program at all is Part 2 information.
DEFAULT_LABELS: tuple[Mapping[str, Any], ...] = tuple(PART2_LABELS)
NOTE_LABELS: tuple[Mapping[str, Any], ...] = (
    *DEFAULT_LABELS,
    {"system": consent.ACT_CODE, "code": "PSYTHPN"},
)
DEFAULT_PURPOSE = "TREAT"


# The restrictions decided, per store, with the state of its Consents they were decided on
# (ResourceStore.type_versions): a partner's every request needs one, and deciding it reads and weighs every Consent
# of its patients.
_DECIDED: WeakKeyDictionary[ResourceStore, dict[tuple[str, str, date], tuple[tuple[int, int], Restriction]]] = (
    WeakKeyDictionary()
)
_DECIDED_LOCK = threading.Lock()
_KEPT = 256  # (recipient, purpose, day) entries kept per store


def restriction_for(store: ResourceStore, recipient: str, purpose: str | None, on: date) -> Restriction:
    """The patients whose records ``recipient`` ("Organization/<id>") may see on day ``on`` for ``purpose`` (a
    v3-ActReason code, TREAT when the token names none), and those whose SUD counseling notes too.

    Only patients with an active Consent naming the recipient can qualify; every active Consent of each such patient
    is then weighed (a later deny, an opt-out without actors, a revocation), as consent.decide does. The answer is
    kept and given again while no Consent has been written since (checked on the database on every call, so a
    Consent written by any process counts at once); the Consents are its only input besides the arguments."""
    purpose = purpose or DEFAULT_PURPOSE
    state = store.type_versions("Consent")  # read before the Consents: a write in between only makes the next call redo
    key = (recipient, purpose, on)
    with _DECIDED_LOCK:
        known = _DECIDED.get(store, {}).get(key)
    if known is not None and known[0] == state:
        return known[1]
    decided = _decide(store, recipient, purpose, on)
    with _DECIDED_LOCK:
        entries = _DECIDED.setdefault(store, {})
        if len(entries) >= _KEPT:
            entries.clear()
        entries[key] = (state, decided)
    return decided


def _decide(store: ResourceStore, recipient: str, purpose: str, on: date) -> Restriction:
    candidates = {
        patient
        for resource in _consents(store, [("actor", recipient), ("status", "active")])
        if (patient := _patient_id(resource)) is not None
    }
    by_patient: dict[str, list[dict[str, Any]]] = defaultdict(list)
    ordered = sorted(candidates)
    for start in range(0, len(ordered), search.MAX_VALUES):
        chunk = ordered[start : start + search.MAX_VALUES]
        params = [("patient", ",".join(f"Patient/{p}" for p in chunk)), ("status", "active")]
        for resource in _consents(store, params):
            patient = _patient_id(resource)
            if patient is not None:
                by_patient[patient].append(resource)
    patients, notes = set(), set()
    for patient, consents in by_patient.items():
        if consent.decide(consents, recipient, purpose, DEFAULT_LABELS, on).permit:
            patients.add(patient)
            if consent.decide(consents, recipient, purpose, NOTE_LABELS, on).permit:
                notes.add(patient)
    return Restriction(frozenset(patients), frozenset(notes))


def _consents(store: ResourceStore, params: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
    offset = 0
    while True:
        request = search.parse(
            "Consent", [*params, ("_count", str(PAGE)), ("_offset", str(offset))], default_count=PAGE, max_count=PAGE
        )
        result = store.search(request)
        for stored in result.matches:
            if stored.content is not None:
                yield orjson.loads(stored.content)
        if not result.has_more:
            return
        offset += PAGE


def patient_id(reference: object) -> str | None:
    """The id of the Patient a reference names (``Patient/x``, absolute ``…/Patient/x``, or versioned), or None;
    only a FHIR id can name a stored Patient (and only such ids are ever rendered into a statement by
    privacy/restriction.py)."""
    if isinstance(reference, str) and "Patient/" in reference:
        found = reference.rsplit("Patient/", 1)[1].split("/_history/", 1)[0]
        return found if search.is_id(found) else None
    return None


def _patient_id(resource: Mapping[str, Any]) -> str | None:
    return patient_id((resource.get("patient") or {}).get("reference"))


def redisclosure_mark() -> dict[str, Any]:
    """The RedisclosureProhibitionMark label carrying the §2.32 notice (DS4P display extension), which every
    disclosure of Part 2 records carries."""
    return {
        "system": MARK_SYSTEM,
        "code": "RedisclosureProhibitionMark",
        "display": "prohibition against redisclosure mark",
        "extension": [{"url": DS4P_DISPLAY, "valueString": REDISCLOSURE_NOTICE}],
    }


def mark_disclosed(body: bytes) -> bytes:
    """A response to a partner's client as it is disclosed: the resource, or every resource of a Bundle (searchset,
    history, batch or transaction response) and the Bundle itself, carries the Part 2 labels and the redisclosure
    notice in its meta.security, whether or not it was stored with them (that a patient's record is held by the
    program at all is Part 2 information). Anything else (an OperationOutcome) is returned as it is."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(parsed, dict) or parsed.get("resourceType") in (None, "OperationOutcome"):
        return body
    if parsed["resourceType"] == "Bundle":
        for entry in parsed.get("entry") or []:
            if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                entry["resource"] = _labelled(entry["resource"])
    return orjson.dumps(_labelled(parsed))


def _labelled(resource: dict[str, Any]) -> dict[str, Any]:
    """``resource`` with the Part 2 labels it lacks and the redisclosure mark added to meta.security (resourceType,
    id and meta first, as stored)."""
    if resource.get("resourceType") in (None, "OperationOutcome"):
        return resource
    meta = dict(resource.get("meta") or {})
    security = list(meta.get("security") or [])
    present = {(s.get("system"), s.get("code")) for s in security if isinstance(s, dict)}
    security += [label for label in PART2_LABELS if (label["system"], label["code"]) not in present]
    if (MARK_SYSTEM, "RedisclosureProhibitionMark") not in present:
        security.append(redisclosure_mark())
    meta["security"] = security
    ordered = {"resourceType": resource["resourceType"]}
    if "id" in resource:
        ordered["id"] = resource["id"]
    ordered["meta"] = meta
    ordered.update((k, v) for k, v in resource.items() if k not in ordered)
    return ordered
