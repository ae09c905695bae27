"""Transitions to aftercare: a discharge with a referral sends the partner one transaction Bundle (Patient,
continuing-care CarePlan, ServiceRequest, Task, and the patient's Consent to that partner) through the outbox, in the
same database transaction as the discharge. Without an active consent the delivery waits as blocked.
"""

from __future__ import annotations

from datetime import date
from typing import Any

import orjson

from iop_fhir.exchange import outbox, package
from iop_fhir.store.base import StoredRecord, WriteTx

# Roles of the discharge's own resources that make up the package, in the order the receiver should create them.
PACKAGE_ROLES = ("continuing-care", "referral", "referral-task")
# Purposes a consent must permit for a transition (TERMINOLOGY.md §6.3: treatment and its coordination).
TRANSITION_PURPOSES = {"treatment", "care-coordination"}
NO_CONSENT = "blocked: no consent"


def on_record_saved(tx: WriteTx, record: StoredRecord, store: Any) -> None:
    """RecordService hook: a saved or retracted discharge with a referral goes to its partner."""
    if record.kind != "discharge":
        return
    referral = record.content.get("referral")
    if not isinstance(referral, dict) or not referral.get("partner"):
        return
    partner = str(referral["partner"])
    resources = _resources(tx, record, store)
    if not resources:
        return
    consent = active_consent(store, record.enrollment_id, partner, record.content.get("discharge_date"))
    if consent is not None:
        resources.extend(_own(tx, consent, ("consent",)))
    bundle = package.transaction(resources, labels=_labels(resources))
    outbox.enqueue(
        tx,
        partner,
        record.kind,
        record.id,
        "bundle",
        {"method": "POST", "url": "", "body": bundle},
        blocked=None if consent is not None else f"{NO_CONSENT} from the patient to disclose to '{partner}'",
    )


def active_consent(store: Any, enrollment_id: str | None, partner: str, on: str | None) -> StoredRecord | None:
    """The patient's newest active consent that permits disclosure to the partner for a transition on that day."""
    if enrollment_id is None:
        return None
    day = on or date.today().isoformat()
    consents, _ = store.records("consent", enrollment_id=enrollment_id, offset=0, count=1000)
    fitting = [
        c
        for c in consents
        if c.status == "active"
        and c.content.get("recipient") == partner
        and c.content.get("scope") != "sud-counseling-notes"
        and TRANSITION_PURPOSES & set(c.content.get("purposes") or [])
        and c.content.get("signed_on", "") <= day
        and (not c.content.get("expires_on") or day <= c.content["expires_on"])
    ]
    return max(fitting, key=lambda c: c.content.get("signed_on", "")) if fitting else None


def _resources(tx: WriteTx, record: StoredRecord, store: Any) -> list[dict[str, Any]]:
    own = _own(tx, record, PACKAGE_ROLES)
    if not own:
        return []
    enrollment = store.record("enrollment", record.enrollment_id) if record.enrollment_id else None
    patient = _own(tx, enrollment, ("patient",)) if enrollment is not None else []
    return patient + own


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


def summary(record: StoredRecord, store: Any) -> dict[str, Any] | None:
    """Where a discharge's transition stands, for `GET /iop/discharges/{id}`: the newest delivery to the partner and
    the referral Task as the partner last reported it."""
    if record.kind != "discharge" or not isinstance(record.content.get("referral"), dict):
        return None
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
    return {"transition": out}
