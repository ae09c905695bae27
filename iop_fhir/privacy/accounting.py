"""The accounting of disclosures of one patient (42 CFR §2.24, HIPAA §164.528): every AuditEvent that names the
enrollment's Patient and an information recipient (IRCP): a partner's reads and searches, and every delivery to a
partner. Newest first; built from the audit trail, which nothing can change through the API."""

from __future__ import annotations

from typing import Any

import orjson

from iop_fhir.errors import NotFound
from iop_fhir.fhir.repository import Repository
from iop_fhir.privacy import audit

RECIPIENT = "IRCP"
_PAGE = 1000


def accounting(repository: Repository, enrollment_id: str, *, offset: int, count: int) -> dict[str, Any]:
    """``{enrollment, patient, total, items}``; each item says when, to whom, for what purpose, how (read, search,
    disclose, ...), with what outcome, which resources, and the AuditEvent it comes from."""
    enrollment = repository.store.record("enrollment", enrollment_id)
    if enrollment is None:
        raise NotFound(f"there is no enrollment record with id {enrollment_id[:80]!r}", "id")
    patient = next((e["reference"] for e in enrollment.resources if e["role"] == "patient"), None)
    items: list[dict[str, Any]] = []
    if patient is not None:
        at = 0
        while True:
            request, result = repository.search(
                "AuditEvent",
                [("patient", patient), ("_sort", "-date"), ("_count", str(_PAGE)), ("_offset", str(at))],
            )
            for stored in result.matches:
                if stored.content is not None:
                    item = _item(orjson.loads(stored.content), patient)
                    if item is not None:
                        items.append(item)
            if not result.has_more:
                break
            at += _PAGE
    return {
        "enrollment": enrollment_id,
        "patient": patient,
        "total": len(items),
        "items": items[offset : offset + count],
    }


def _item(event: dict[str, Any], patient: str) -> dict[str, Any] | None:
    recipients = [
        agent["who"]["reference"]
        for agent in event.get("agent") or []
        if any(c.get("code") == RECIPIENT for c in (agent.get("type") or {}).get("coding") or [])
        and isinstance((agent.get("who") or {}).get("reference"), str)
    ]
    if not recipients:
        return None
    purposes = [
        coding.get("code")
        for agent in event.get("agent") or []
        for concept in agent.get("purposeOfUse") or []
        for coding in concept.get("coding") or []
        if coding.get("system") == audit.ACT_REASON
    ]
    subtype = [c.get("code") for c in event.get("subtype") or []]
    how = "disclose" if (event.get("type") or {}).get("code") == "110106" and not subtype else (subtype or [None])[0]
    resources = [
        e["what"]["reference"]
        for e in event.get("entity") or []
        if isinstance((e.get("what") or {}).get("reference"), str) and e["what"]["reference"] != patient
    ]
    item: dict[str, Any] = {
        "date": event.get("recorded"),
        "recipient": recipients[0],
        "purpose": purposes[0] if purposes else None,
        "action": how,
        "outcome": event.get("outcome"),
        "resources": resources,
        "audit_event": f"AuditEvent/{event.get('id')}",
    }
    # The search query of the event is not shown: it may name other patients.
    return item
