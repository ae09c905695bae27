"""Follows the aftercare partner's Task of each delivered transition (accepted, declined, completed) and reflects it
on our Task, which `GET /iop/discharges/{id}` and `/fhir/Task` then show.

The partner's Task is found by the identifier we sent it with (conditional update on the iop-record identifier), so
nothing depends on the partner's ids or on the delivery's response.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson

from iop_fhir.config import Settings
from iop_fhir.exchange.client import DeliveryError, PartnerClient
from iop_fhir.fhir.repository import Repository
from iop_fhir.mapping import ids
from iop_fhir.store.base import Delivery, Outbox, RecordStore, ResourceStore

log = logging.getLogger("iop_fhir.exchange.followup")

# Task states after which the partner will not change the Task any more (R4 task-status).
FINAL = {"completed", "rejected", "cancelled", "failed", "entered-in-error"}
# What of the partner's Task is copied onto ours.
FOLLOWED = ("status", "businessStatus", "statusReason", "lastModified")


def follow(
    repository: Repository,
    settings: Settings,
    client_for: Callable[[dict[str, Any], Settings], PartnerClient],
    *,
    limit: int = 500,
) -> int:
    """One pass over the delivered transitions whose Task is not final; returns how many Tasks changed."""
    store = repository.store
    changed = 0
    for record_id, row in _delivered_transitions(store, limit).items():
        open_task = _open_task(record_id, records=store, resources=store)
        if open_task is None:
            continue
        res_type, res_id, task = open_task
        partner = store.record("partner", row.partner_id)
        if partner is None or partner.status != "active":
            continue
        identifier = ids.identifier_value("discharge", record_id, "referral-task")
        try:
            client = client_for(partner.content, settings)
            found = list(client.search("Task", [("identifier", f"{ids.RECORD_SYSTEM}|{identifier}")]))
        except DeliveryError as error:
            log.warning("following the Task of a transition to %s failed: %s", row.partner_id, error.message)
            continue
        theirs = next((r for r in found if r.get("resourceType") == "Task"), None)
        if theirs is None:
            continue
        update = {k: theirs[k] for k in FOLLOWED if k in theirs}
        if all(task.get(k) == v for k, v in update.items()):
            continue
        with store.write() as tx:
            latest_version = tx.current(res_type, res_id)
            if latest_version is None or latest_version.content is None:
                continue
            repository.update_in(tx, res_type, res_id, {**orjson.loads(latest_version.content), **update})
        changed += 1
    return changed


def _delivered_transitions(outbox: Outbox, limit: int) -> dict[str, Delivery]:
    """The newest delivered row of each discharge, by the discharge's id."""
    rows, _ = outbox.deliveries(status="delivered", record_kind="discharge", offset=0, count=limit)
    return {row.record_id: row for row in rows if row.record_id is not None}


def _open_task(
    discharge_id: str, *, records: RecordStore, resources: ResourceStore
) -> tuple[str, str, dict[str, Any]] | None:
    """Our referral Task of an active discharge (type, id, content), unless it is final."""
    record = records.record("discharge", discharge_id)
    if record is None or record.status != "active":
        return None
    ours = next((e["reference"] for e in record.resources if e["role"] == "referral-task"), None)
    if ours is None:
        return None
    res_type, res_id = ours.split("/", 1)
    current = resources.read(res_type, res_id)
    if current is None or current.deleted or current.content is None:
        return None
    task: dict[str, Any] = orjson.loads(current.content)
    return None if task.get("status") in FINAL else (res_type, res_id, task)
