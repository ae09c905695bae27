"""Transitions to aftercare: a discharge with a referral sends the partner one transaction Bundle (Patient,
continuing-care CarePlan, ServiceRequest, Task, the patient's Consent to that partner, and the transition-of-care
document of exchange/document.py) through the outbox, in the same database transaction as the discharge. Without a
consent that permits it (privacy/pushes.py: decide() over the patient's FHIR Consents) the delivery waits as blocked.

A consent saved, revoked or retracted later acts on what has not gone yet to its recipient, in the consent's
transaction (`release`): when it permits, every row of the enrollment's records blocked for lack of consent, and
every pending row whose package differs from the one rebuilt now (it carries another Consent, or an older version),
is superseded by a new pending row holding the package rebuilt from the records as they are now, with the Consent
that permits it. The old row is kept (status superseded, its
last error naming the row that replaced it), never deleted or rewritten, so the outbox stays the log of what was
queued, held back and sent. When it no longer permits, pending rows become blocked. The worker decides again right
before it sends (a consent also ends by expiry, with no write to react to).
"""

from __future__ import annotations

from typing import Any

import orjson

from iop_fhir.exchange import document, outbox, package
from iop_fhir.privacy import pushes
from iop_fhir.r4.instants import instant, now_us
from iop_fhir.store.base import Delivery, StoredRecord, WriteTx

# Roles of the discharge's own resources that make up the package, in the order the receiver should create them.
PACKAGE_ROLES = ("continuing-care", "referral", "referral-task")
NO_CONSENT = pushes.NO_CONSENT
# A package and why it may not go now (None: a consent permits it, and the package carries that Consent).
Package = tuple[dict[str, Any], str | None]


def on_record_saved(tx: WriteTx, record: StoredRecord, store: Any) -> None:
    """RecordService hook: a saved or retracted discharge with a referral goes to its partner; a saved, revoked or
    retracted consent releases or holds back what waits for its recipient."""
    if record.kind == "consent":
        release(tx, record, store)
        return
    if record.kind != "discharge":
        return
    partner = _partner(record)
    if partner is None:
        return
    built = package_for(tx, record, store, partner)
    if built is None:
        return
    bundle, blocked = built
    outbox.enqueue(tx, partner, record.kind, record.id, "bundle", outbox.bundle_payload(bundle), blocked=blocked)


def package_for(tx: WriteTx, record: StoredRecord, store: Any, partner: str) -> Package | None:
    """The discharge's package as its resources are now, and why it may not go (None when a consent permits it,
    and then the package carries that Consent); None when the discharge has no package."""
    resources = _resources(tx, record, store)
    if not resources:
        return None
    reader = pushes.TxReader(tx)
    patient = pushes.patient_of(reader, record)
    decided = pushes.decision(pushes.consents(reader, patient), partner, resources, pushes.today())
    blocked = None
    if decided.permit and decided.consent is not None:
        resources.extend(_current(tx, decided.consent))
    else:
        blocked = pushes.blocked_reason(partner, decided)
    bundle = package.transaction(resources, labels=_labels(resources))
    # The transition-of-care document goes in the same transaction (exchange/document.py).
    consent = decided.consent if blocked is None else None
    bundle["entry"].append(document.transaction_entry(_document(tx, record, store, consent)))
    return bundle, blocked


def _document(tx: WriteTx, record: StoredRecord, store: Any, consent: str | None) -> dict[str, Any]:
    """The discharge's transition-of-care document as its records are now, the same document as before when they
    did not change, replacing the one sent before when they did."""

    def read(res_type: str, res_id: str) -> dict[str, Any] | None:
        current = tx.current(res_type, res_id)
        if current is None or current.deleted or current.content is None:
            return None
        return dict(orjson.loads(current.content))

    resources = document.gather(store, record, read=read, consents=[consent] if consent else [])
    discharge = {"id": record.id, "content": record.content, "status": record.status}
    built = document.transition_document(discharge, resources, timestamp=instant(record.updated))
    rows, _ = store.deliveries(record_kind=record.kind, record_id=record.id, offset=0, count=1000)
    return document.settle(built, rows)


def release(tx: WriteTx, consent_record: StoredRecord, store: Any) -> list[str]:
    """Act on the undelivered rows to the consent's recipient of its enrollment's records (see the module
    docstring). Returns the ids of the rows added."""
    partner = consent_record.content.get("recipient")
    enrollment_id = consent_record.enrollment_id
    if not isinstance(partner, str) or enrollment_id is None:
        return []
    reader = pushes.TxReader(tx)
    added: list[str] = []
    replaced: dict[tuple[str, str | None], str | None] = {}
    rows = [
        row
        for row in tx.deliveries_to(partner, ("blocked", "pending"))
        if row.kind == "bundle" and (row.status == "pending" or pushes.is_blocked_for_consent(row))
    ]
    # Newest first: the newest row of a record is rebuilt, older ones of the same record are superseded by it.
    for row in reversed(rows):
        source = pushes.source_of(reader, row)
        if source is None or source.enrollment_id != enrollment_id:
            continue
        key = (row.record_kind, row.record_id)
        if key in replaced:
            _supersede(tx, row, replaced[key])
            continue
        rebuilt = _rebuild(tx, row, source, store, partner)
        if rebuilt is None:
            continue
        bundle, blocked = rebuilt
        if blocked is not None:
            replaced[key] = None
            if row.status == "pending":
                tx.set_delivery_status(row.id, ("pending",), "blocked", _error(blocked), now_us())
            continue
        if row.status == "pending" and row.payload.get("body") == bundle:
            replaced[key] = None
            continue
        new_id = outbox.enqueue(tx, partner, row.record_kind, row.record_id, "bundle", outbox.bundle_payload(bundle))
        added.append(new_id)
        replaced[key] = new_id
        _supersede(tx, row, new_id)
    return added


def _rebuild(tx: WriteTx, row: Delivery, source: StoredRecord, store: Any, partner: str) -> Package | None:
    if row.record_kind == "discharge":
        return package_for(tx, source, store, partner)
    if row.record_kind == pushes.REFERRAL_KIND and not pushes.answers_before_admission(
        row.record_kind, row.payload["body"]
    ):
        from iop_fhir.exchange import referrals

        return referrals.with_consent(tx, row.payload["body"], source, partner)
    return None


def _supersede(tx: WriteTx, row: Delivery, new_id: str | None) -> None:
    if new_id is None:
        return
    message = f"superseded by delivery {new_id}: a consent now permits it, and the package was rebuilt with it"
    tx.set_delivery_status(row.id, ("pending", "blocked"), "superseded", _error(message), now_us())


def _error(message: str) -> dict[str, Any]:
    return {"status": None, "retryable": False, "message": message, "outcome": None, "retry_after": None}


def _partner(record: StoredRecord) -> str | None:
    referral = record.content.get("referral")
    if not isinstance(referral, dict) or not referral.get("partner"):
        return None
    return str(referral["partner"])


def _current(tx: WriteTx, reference: str) -> list[dict[str, Any]]:
    res_type, res_id = reference.split("/", 1)
    current = tx.current(res_type, res_id)
    if current is None or current.deleted or current.content is None:
        return []
    return [orjson.loads(current.content)]


def _resources(tx: WriteTx, record: StoredRecord, store: Any) -> list[dict[str, Any]]:
    own = _own(tx, record, PACKAGE_ROLES)
    if not own:
        return []
    enrollment = store.record("enrollment", record.enrollment_id) if record.enrollment_id else None
    patient = _own(tx, enrollment, ("patient",)) if enrollment is not None else []
    return patient + _organizations(tx, own) + own


# Where the referral names Organizations: the program (requester, author) and the partner (owner, performer).
_ORGANIZATION_ELEMENTS = ("requester", "owner", "performer", "author")


def _organizations(tx: WriteTx, resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Organizations the package's resources name, so that the receiver can resolve requester and owner."""
    references: list[str] = []
    for resource in resources:
        for element in _ORGANIZATION_ELEMENTS:
            value = resource.get(element)
            for item in value if isinstance(value, list) else [value]:
                reference = item.get("reference") if isinstance(item, dict) else None
                if isinstance(reference, str) and reference.startswith("Organization/") and reference not in references:
                    references.append(reference)
    return [found for reference in references for found in _current(tx, reference)]


def _own(tx: WriteTx, record: StoredRecord, roles: tuple[str, ...]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for role in roles:
        for entry in record.resources:
            if entry["role"] != role:
                continue
            res_type, res_id = entry["reference"].split("/", 1)
            current = tx.current(res_type, res_id)
            if current is not None and not current.deleted and current.content is not None:
                found.append(orjson.loads(current.content))
    return found


def _labels(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    labels: list[dict[str, Any]] = []
    for resource in resources:
        for label in resource.get("meta", {}).get("security", []):
            if label not in labels:
                labels.append(label)
    return labels


def summary(record: StoredRecord, store: Any, *, overdue_days: int = 7) -> dict[str, Any] | None:
    """Where a discharge's transition stands, for `GET /iop/discharges/{id}`: the newest delivery to the partner,
    the referral Task as the partner last reported it, the steps of the closed loop (exchange/followup.py) and
    whether the partner's acceptance is overdue."""
    if record.kind != "discharge" or not isinstance(record.content.get("referral"), dict):
        return None
    from iop_fhir.exchange import followup

    loop = followup.transition_state(record, store, overdue_days, now_us())
    rows, _ = store.deliveries(record_kind=record.kind, record_id=record.id, offset=0, count=1000)
    newest = rows[-1] if rows else None
    out: dict[str, Any] = {"partner": record.content["referral"].get("partner")}
    if newest is not None:
        out["delivery"] = {"id": newest.id, "status": newest.status, "attempts": newest.attempts}
    task_ref = next((e["reference"] for e in record.resources if e["role"] == "referral-task"), None)
    if task_ref is not None:
        res_type, res_id = task_ref.split("/", 1)
        current = store.read(res_type, res_id)
        if current is not None and current.content is not None:
            task = orjson.loads(current.content)
            out["task"] = {"reference": task_ref, "status": task.get("status")}
            business = (task.get("businessStatus") or {}).get("coding") or []
            if business:
                out["task"]["business_status"] = {k: business[0].get(k) for k in ("code", "display")}
            reason = (task.get("statusReason") or {}).get("text")
            if reason:
                out["task"]["status_reason"] = reason
    out.update(loop)
    return {"transition": out}
