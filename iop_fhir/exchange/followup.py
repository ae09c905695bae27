"""Closes the loop of each delivered transition: follows the aftercare partner's Task (accepted, scheduled, first
visit attended, declined, completed) and copies its status, business status, status reason and outputs onto our
Task, one new version per change, which `GET /iop/discharges/{id}` shows as the transition's timeline and
`/fhir/Task` as the Task's history. A transition that the partner has not accepted some days after it was queued is
overdue (IOP_FHIR_TRANSITION_OVERDUE_DAYS).

The partner's Task is found by the identifier we sent it with (conditional update on the iop-record identifier), so
nothing depends on the partner's ids or on the delivery's response. Business statuses are BSeR's
TaskBusinessStatusCS (http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS, TERMINOLOGY.md §5.5).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from iop_fhir.config import Settings
from iop_fhir.exchange.client import DeliveryError, PartnerClient
from iop_fhir.fhir.repository import Repository
from iop_fhir.mapping import ids
from iop_fhir.r4.instants import instant
from iop_fhir.store.base import Delivery, Outbox, RecordStore, ResourceStore, StoredRecord, StoredResource

log = logging.getLogger("iop_fhir.exchange.followup")

BSER = "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS"
# Task states after which the partner will not change the Task any more (R4 task-status).
FINAL = {"completed", "rejected", "cancelled", "failed", "entered-in-error"}
# States in which the partner has not yet taken the referral on: a transition still in one is waiting for acceptance.
UNACCEPTED = {"draft", "requested", "received", "ready"}
# What of the partner's Task is copied onto ours: the first two only when the partner has them (a partner that does
# not use business statuses leaves ours as it was), the others as the partner has them (absent: removed).
KEPT_WHEN_ABSENT = ("status", "businessStatus")
FOLLOWED = ("statusReason", "output")
DAY_US = 86_400 * 1_000_000
# The step of the closed loop each BSeR business status stands for (TaskBusinessStatusCS, HL7/bser @7f97143).
BUSINESS_EVENTS = {
    "2.0": "created",
    "3.0": "accepted",
    "4.0": "declined",
    "5.1.1": "scheduled",
    "5.1.2": "first-visit-missed",
    "5.1.3": "visit-cancelled",
    "5.1.4": "first-visit-attended",
    "5.2": "cancellation-requested",
    "6.0": "cancelled",
    "7.0": "completed",
}
# The step a Task status stands for when its business status says no more (R4 task-status).
STATUS_EVENTS = {
    "draft": "created",
    "requested": "created",
    "received": "received",
    "accepted": "accepted",
    "rejected": "declined",
    "ready": "ready",
    "cancelled": "cancelled",
    "in-progress": "in-progress",
    "on-hold": "on-hold",
    "failed": "failed",
    "completed": "completed",
}
APPOINTMENT_PREFIX = "Appointment on "
# The versions of a Task a timeline is built from, newest first: far more than a transition ever has.
VERSIONS_READ = 1000


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
            theirs = next((r for r in found if r.get("resourceType") == "Task"), None)
            if theirs is None:
                continue
            followed = reflect(task, theirs, client)
        except DeliveryError as error:
            log.warning("following the Task of a transition to %s failed: %s", row.partner_id, error.message)
            continue
        if followed is None:
            continue
        with store.write() as tx:
            latest_version = tx.current(res_type, res_id)
            if latest_version is None or latest_version.content is None:
                continue
            latest = reflect(orjson.loads(latest_version.content), theirs, client, resolved=followed)
            if latest is None:
                continue
            repository.update_in(tx, res_type, res_id, latest)
        changed += 1
    return changed


def reflect(
    ours: dict[str, Any],
    theirs: dict[str, Any],
    client: PartnerClient,
    *,
    resolved: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Our Task with what the partner's Task says, or None when that changes nothing. The partner's outputs are
    made absolute (its relative references name resources on its server), and an Appointment it names is read for
    its start (kept as the reference's display) when the reference has no display of its own; ``resolved`` is a
    Task already reflected, whose outputs are taken as they are."""
    update: dict[str, Any] = {k: theirs[k] for k in KEPT_WHEN_ABSENT if k in theirs}
    for key in FOLLOWED:
        if key in theirs:
            update[key] = theirs[key]
    if "output" in update:
        update["output"] = (
            resolved["output"] if resolved is not None and "output" in resolved else _outputs(update["output"], client)
        )
    removed = [k for k in FOLLOWED if k not in theirs and k in ours]
    if not removed and all(ours.get(k) == v for k, v in update.items()):
        return None
    task = {k: v for k, v in ours.items() if k not in removed}
    task.update(update)
    if "lastModified" in theirs:
        task["lastModified"] = theirs["lastModified"]
    return task


def _outputs(outputs: Any, client: PartnerClient) -> list[dict[str, Any]]:
    if not isinstance(outputs, list):
        return []
    out: list[dict[str, Any]] = []
    for output in outputs:
        if not isinstance(output, dict):
            continue
        output = dict(output)
        value = output.get("valueReference")
        if isinstance(value, dict) and isinstance(value.get("reference"), str):
            reference = value["reference"]
            value = dict(value)
            if "://" not in reference and not reference.startswith(("#", "urn:")):
                value["reference"] = f"{client.base_url}/{reference}"
                if reference.startswith("Appointment/") and not value.get("display"):
                    start = client.read(reference).get("start")
                    if isinstance(start, str):
                        value["display"] = APPOINTMENT_PREFIX + start
            output["valueReference"] = value
        out.append(output)
    return out


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
    ours = _task_reference(record)
    if ours is None:
        return None
    res_type, res_id = ours.split("/", 1)
    current = resources.read(res_type, res_id)
    if current is None or current.deleted or current.content is None:
        return None
    task: dict[str, Any] = orjson.loads(current.content)
    return None if task.get("status") in FINAL else (res_type, res_id, task)


def _task_reference(record: StoredRecord) -> str | None:
    return next((e["reference"] for e in record.resources if e["role"] == "referral-task"), None)


# -- the timeline and overdue transitions ----------------------------------------------------------------------------


def timeline(record: StoredRecord, store: Any, *, sent: bool = True) -> list[dict[str, Any]]:
    """The steps of a discharge's transition, oldest first: the referral created, sent (the first delivery the partner
    took), then each change the partner reported (received, accepted, scheduled with its date, first visit attended
    or missed, declined with its reason, completed), each once, as the versions of our Task hold them. Each step is
    {at, event, status, business_status, detail} (and scheduled_for when a date is known); `at` is when this service
    recorded it. Without ``sent`` the outbox is not read and the step "sent" is left out (the outcomes need only
    the partner's answers, for every discharge at once)."""
    ref = _task_reference(record)
    if ref is None:
        return []
    res_type, res_id = ref.split("/", 1)
    versions, _ = store.history(res_type, res_id, since=None, at=None, count=VERSIONS_READ, offset=0)
    return _timeline(versions, _first_delivered(record, store) if sent else None)


def timelines(records: Sequence[StoredRecord], store: ResourceStore) -> dict[str, list[dict[str, Any]]]:
    """The timelines of many discharges by their ids, each as ``timeline(record, store, sent=False)`` gives it (the
    partner's answers only), from the versions of all their Tasks read at once (the outcomes of a period build one
    per discharge)."""
    tasks = {record.id: _task_reference(record) for record in records}
    wanted: dict[str, set[str]] = defaultdict(set)
    for ref in tasks.values():
        if ref is not None:
            res_type, res_id = ref.split("/", 1)
            wanted[res_type].add(res_id)
    versions = {
        f"{res_type}/{res_id}": found
        for res_type, res_ids in wanted.items()
        for res_id, found in store.histories(res_type, sorted(res_ids)).items()
    }
    return {
        discharge: [] if ref is None else _timeline(versions.get(ref, [])[:VERSIONS_READ], None)
        for discharge, ref in tasks.items()
    }


def _timeline(versions: list[StoredResource], first: Delivery | None) -> list[dict[str, Any]]:
    """The steps of a Task's versions (newest first, as history gives them) and of its first delivery."""
    steps: list[tuple[int, dict[str, Any]]] = []
    seen: set[bytes] = set()
    for version in sorted(versions, key=lambda v: v.version_id):
        if version.deleted or version.content is None:
            continue
        task = orjson.loads(version.content)
        if task.get("status") == "entered-in-error":
            continue
        key = orjson.dumps([task.get(k) for k in ("status", "businessStatus", "statusReason", "output")])
        if key in seen:
            continue
        seen.add(key)
        steps.append((version.last_updated, _step(task, version.last_updated)))
    if first is not None and first.delivered_at is not None:
        step = {
            "at": instant(first.delivered_at),
            "event": "sent",
            "status": "requested",
            "business_status": None,
            "detail": f"sent to {first.partner_id} (delivery {first.id})",
        }
        steps.append((first.delivered_at, step))
    steps.sort(key=lambda s: s[0])
    return [step for _, step in steps]


def _step(task: dict[str, Any], at: int) -> dict[str, Any]:
    status = task.get("status")
    coding = next((c for c in (task.get("businessStatus") or {}).get("coding") or [] if c.get("system") == BSER), None)
    code = coding.get("code") if coding else None
    event = BUSINESS_EVENTS.get(str(code)) if code not in (None, "2.0") else None
    event = event or STATUS_EVENTS.get(str(status), str(status))
    scheduled = scheduled_for(task.get("output"))
    reason = (task.get("statusReason") or {}).get("text")
    details = {
        "created": "referral created",
        "received": "received by the partner",
        "accepted": "accepted by the partner",
        "scheduled": "first visit scheduled" + (f" for {scheduled}" if scheduled else ""),
        "first-visit-attended": "first visit attended",
        "first-visit-missed": "first visit missed",
        "declined": "declined by the partner",
        "completed": "referral fulfilled",
    }
    detail = details.get(event) or (coding or {}).get("display") or f"Task {status}"
    if reason:
        detail = f"{detail}: {reason}"
    step: dict[str, Any] = {
        "at": instant(at),
        "event": event,
        "status": status,
        "business_status": {k: coding.get(k) for k in ("code", "display")} if coding else None,
        "detail": detail,
    }
    if scheduled:
        step["scheduled_for"] = scheduled
    return step


def scheduled_for(outputs: Any) -> str | None:
    """The date of the visit a Task's outputs name: a valueDateTime, a valuePeriod's start, or the start of an
    Appointment as following the partner's Task recorded it."""
    for output in outputs if isinstance(outputs, list) else []:
        if not isinstance(output, dict):
            continue
        if isinstance(output.get("valueDateTime"), str):
            return str(output["valueDateTime"])
        start = (output.get("valuePeriod") or {}).get("start")
        if isinstance(start, str):
            return start
        display = (output.get("valueReference") or {}).get("display")
        if isinstance(display, str) and display.startswith(APPOINTMENT_PREFIX):
            return display[len(APPOINTMENT_PREFIX) :]
    return None


def _first_delivered(record: StoredRecord, store: Any) -> Delivery | None:
    rows, _ = store.deliveries(record_kind=record.kind, record_id=record.id, offset=0, count=1000)
    delivered = [r for r in rows if r.delivered_at is not None]
    return min(delivered, key=lambda r: r.delivered_at or 0) if delivered else None


def overdue_since(record: StoredRecord, store: Any, days: int, now: int) -> int | None:
    """When an active discharge's transition became overdue (microseconds), or None: it is overdue when its Task is
    still waiting for acceptance `days` days after the transition was first queued for the partner."""
    if record.kind != "discharge" or record.status != "active":
        return None
    ref = _task_reference(record)
    if ref is None:
        return None
    rows, _ = store.deliveries(record_kind=record.kind, record_id=record.id, offset=0, count=1000)
    if not rows:
        return None
    due = int(min(r.created for r in rows)) + days * DAY_US
    if now < due or not _waiting(store, ref):
        return None
    return due


def _waiting(store: Any, task_reference: str) -> bool:
    """Whether the Task has never left the states before acceptance. Its history is read, not only its current
    version: a corrected discharge maps our Task afresh (requested) until the next follow-up copies the partner's
    state back, and a partner that has once answered is not late."""
    res_type, res_id = task_reference.split("/", 1)
    current = store.read(res_type, res_id)
    if current is None or current.deleted or current.content is None:
        return False
    versions, _ = store.history(res_type, res_id, since=None, at=None, count=1000, offset=0)
    statuses = {orjson.loads(v.content).get("status") for v in versions if v.content is not None}
    return statuses <= UNACCEPTED


def transition_state(record: StoredRecord, store: Any, days: int, now: int) -> dict[str, Any]:
    """What the discharge view adds to its transition: {timeline, overdue, accept_by (while the partner has not
    accepted)}."""
    state: dict[str, Any] = {"timeline": timeline(record, store), "overdue": False}
    rows, _ = store.deliveries(record_kind=record.kind, record_id=record.id, offset=0, count=1000)
    ref = _task_reference(record)
    if rows and ref is not None and record.status == "active" and _waiting(store, ref):
        state["accept_by"] = instant(min(r.created for r in rows) + days * DAY_US)
        state["overdue"] = overdue_since(record, store, days, now) is not None
    return state
