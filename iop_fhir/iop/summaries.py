"""The discharge summary served to the program's own staff (`GET /iop/discharges/{id}/summary.html|.pdf`): the
discharge's transition-of-care document built from the records as they are now (exchange/document.py), rendered by
summary.py. The resources the document carries are noted in the request's audit trail, as a record read is.

A saved discharge also stores its PDF as a US Core DocumentReference in the discharge's transaction
(`on_record_saved`), for FHIR clients: `DocumentReference?identifier=https://iop-fhir.org/fhir/sid/iop-record|
discharge/{id}/summary-pdf`, or `?patient=…&type=http://loinc.org|18842-5`."""

from __future__ import annotations

from typing import Any

import orjson
from flask import current_app

from iop_fhir.errors import NotFound
from iop_fhir.exchange import document
from iop_fhir.iop import summary
from iop_fhir.privacy import disclosure, pushes, trail
from iop_fhir.r4.instants import instant
from iop_fhir.store.base import StoredRecord, WriteTx


def transition_document(record_id: str) -> dict[str, Any]:
    """The document of discharge ``record_id``, dated when the discharge was last saved (the same records give the
    same document); NotFound if there is no such discharge."""
    store = current_app.extensions["iop_fhir.store"]
    record = store.record("discharge", record_id)
    if record is None:
        raise NotFound(f"discharge {record_id} is not known", "id")
    resources = document.gather(store, record, consents=_permitting_consent(store, record))
    bundle = document.transition_document(
        {"id": record.id, "content": record.content}, resources, timestamp=instant(record.updated)
    )
    carried = [
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle.get("entry") or []
        if e["resource"].get("resourceType") != "Composition"
    ]
    trail.returned_record({"fhir": carried})
    return bundle


def html(record_id: str) -> str:
    return summary.render_html(transition_document(record_id))


def pdf(record_id: str) -> bytes:
    return summary.render_pdf(transition_document(record_id))


def _permitting_consent(reader: pushes.Reader, record: StoredRecord) -> list[str]:
    """The Consent that permits disclosure to the discharge's aftercare partner today, if there is a referral and
    one does: the document shows the consent it would be sent under."""
    partner = (record.content.get("referral") or {}).get("partner")
    if not isinstance(partner, str):
        return []
    patient = pushes.patient_of(reader, record)
    decided = pushes.decision(
        pushes.consents(reader, patient), partner, [], pushes.today(), bundle_labels=disclosure.DEFAULT_LABELS
    )
    return [decided.consent] if decided.permit and decided.consent is not None else []


def on_record_saved(tx: WriteTx, record: StoredRecord, store: Any, *, repository: Any) -> None:
    """RecordService hook: a saved discharge stores (or updates) the DocumentReference of its PDF summary, rendered
    from its transition-of-care document as the transaction sees the records; a retracted discharge marks it
    entered-in-error. Nothing is written when the DocumentReference would not change."""
    if record.kind != "discharge":
        return
    res_id = summary.document_reference_id(record.id)
    current = _current(tx, "DocumentReference", res_id)
    if record.status == "entered-in-error":
        if current is not None and current.get("status") != "entered-in-error":
            repository.update_in(tx, "DocumentReference", res_id, {**current, "status": "entered-in-error"})
        return

    def read(res_type: str, res_id: str) -> dict[str, Any] | None:
        return _current(tx, res_type, res_id)

    consents = _permitting_consent(pushes.TxReader(tx), record)
    resources = document.gather(store, record, read=read, consents=consents)
    bundle = document.transition_document(
        {"id": record.id, "content": record.content}, resources, timestamp=instant(record.updated)
    )
    resource = summary.document_reference(bundle, summary.render_pdf(bundle), discharge_id=record.id)
    if current is not None and _content(current) == _content(resource):
        return
    repository.update_in(tx, "DocumentReference", res_id, resource)


def _current(tx: WriteTx, res_type: str, res_id: str) -> dict[str, Any] | None:
    found = tx.current(res_type, res_id)
    if found is None or found.deleted or found.content is None:
        return None
    resource: dict[str, Any] = orjson.loads(found.content)
    return resource


def _content(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource without what storing it adds (version and time)."""
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    return {**resource, "meta": meta}
