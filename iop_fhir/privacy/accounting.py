"""The accounting of disclosures of one patient (42 CFR §2.24, HIPAA §164.528): every row of the audit log about the
enrollment's Patient made for a partner's client whose action discloses (a partner's reads, searches, history and
exports, and every delivery to a partner), the partner being the information recipient (IRCP) of the rendered
AuditEvent. Newest first; read from the audit log, which nothing can change through the API."""

from __future__ import annotations

from typing import Any

from iop_fhir.errors import NotFound
from iop_fhir.privacy import audit
from iop_fhir.privacy.auditlog import AuditWriter
from iop_fhir.r4.instants import instant
from iop_fhir.store.base import AuditLog, AuditQuery, AuditRow, RecordStore

# How an item names its action: the interaction, "operation" for an $export (the rendered event's subtype), and
# "disclose" for a delivery.
_HOW = {"export": "operation"}


def accounting(
    records: RecordStore, log: AuditLog, writer: AuditWriter, enrollment_id: str, *, offset: int, count: int
) -> dict[str, Any]:
    """``{enrollment, patient, total, items}``; each item says when, to whom, for what purpose, how (read, search,
    disclose, ...), with what outcome, which resources, and the AuditEvent it comes from."""
    enrollment = records.record("enrollment", enrollment_id)
    if enrollment is None:
        raise NotFound(f"there is no enrollment record with id {enrollment_id[:80]!r}", "id")
    patient = next((e["reference"] for e in enrollment.resources if e["role"] == "patient"), None)
    items: list[dict[str, Any]] = []
    total = 0
    if patient is not None:
        writer.flush()  # what this process audited so far is counted
        query = AuditQuery(
            where=((("patient", patient),), tuple(("action", action) for action in sorted(audit.DISCLOSING))),
            partners_only=True,
            offset=offset,
            count=count,
            total=True,
        )
        rows, found = log.audit_rows(query)
        items = [_item(row) for row in rows]
        total = found or 0
    return {"enrollment": enrollment_id, "patient": patient, "total": total, "items": items}


def _item(row: AuditRow) -> dict[str, Any]:
    # The search query of the row is not shown: it may name other patients.
    return {
        "date": instant(row.recorded),
        "recipient": row.on_behalf_of,
        "purpose": row.purpose,
        "action": _HOW.get(row.action, row.action),
        "outcome": row.outcome,
        "resources": [reference for reference in row.entities if reference != row.patient],
        "audit_event": f"AuditEvent/{row.id}",
    }
