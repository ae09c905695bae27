"""/iop/deliveries: the outbox as operators see it (status, attempts, next attempt, last error) and replay of dead or
blocked deliveries. Payload bodies hold PHI and are never shown, only summarised (exchange/outbox.py)."""

from __future__ import annotations

import re
from typing import Any

from flask import Response, current_app, request
from flask_smorest import Blueprint

from iop_fhir.errors import BadRequest, Conflict, NotFound
from iop_fhir.exchange import followup, outbox
from iop_fhir.iop import schemas, web
from iop_fhir.iop.web import json_response
from iop_fhir.r4.instants import now_us
from iop_fhir.store.base import DELIVERY_STATUSES, RETRYABLE_BY_HAND, Delivery, Outbox

PARAMETERS = ("partner", "status", "record", "offset", "count")
# Not a stored status: transitions waiting too long for the partner's acceptance (exchange/followup.py).
OVERDUE = "overdue"
_RECORD = re.compile(r"([a-z][a-z0-9-]{0,31})/([A-Za-z0-9\-.]{1,64})")

bp = Blueprint(
    "deliveries",
    __name__,
    url_prefix="/iop",
    description="Deliveries to partners through the outbox (application/json): status, errors, replay.",
)

_LIST_DOC = [
    {"in": "query", "name": "partner", "schema": {"type": "string"}, "description": "a partner id"},
    {
        "in": "query",
        "name": "status",
        "schema": {"type": "string", "enum": [*DELIVERY_STATUSES, OVERDUE]},
        "description": "a delivery status, or overdue: the newest delivery of each transition the aftercare partner "
        "has not accepted IOP_FHIR_TRANSITION_OVERDUE_DAYS days after it was queued",
    },
    {"in": "query", "name": "record", "schema": {"type": "string"}, "description": "<kind>/<id>, e.g. discharge/d1"},
    {"in": "query", "name": "offset", "schema": {"type": "integer", "minimum": 0}},
    {"in": "query", "name": "count", "schema": {"type": "integer", "minimum": 0}},
]


def _outbox() -> Outbox:
    rows: Outbox = current_app.extensions["iop_fhir.store"]
    return rows


def _filters() -> dict[str, Any]:
    web.check_parameters(PARAMETERS)
    filters: dict[str, Any] = {}
    partner = request.args.get("partner")
    if partner is not None:
        if not schemas.FHIR_ID.fullmatch(partner):
            raise BadRequest(f"partner must be a partner id, got {partner[:80]!r}", "partner")
        filters["partner_id"] = partner
    status = request.args.get("status")
    if status is not None:
        if status not in DELIVERY_STATUSES and status != OVERDUE:
            allowed = ", ".join([*DELIVERY_STATUSES, OVERDUE])
            raise BadRequest(f"status must be one of {allowed}, got {status[:40]!r}", "status")
        filters["status"] = status
    record = request.args.get("record")
    if record is not None:
        found = _RECORD.fullmatch(record)
        if found is None:
            raise BadRequest(f"record must be <kind>/<id>, e.g. discharge/d1, got {record[:80]!r}", "record")
        filters["record_kind"], filters["record_id"] = found.groups()
    filters["offset"], filters["count"] = web.paging()
    return filters


def _delivery(delivery_id: str) -> Delivery:
    """The delivery, or 404; ids that cannot be delivery ids are not looked up."""
    found = _outbox().delivery(delivery_id) if schemas.FHIR_ID.fullmatch(delivery_id) else None
    if found is None:
        raise NotFound(f"there is no delivery with id {delivery_id[:80]!r}", "id")
    return found


def list_deliveries() -> Response:
    filters = _filters()
    if filters.get("status") == OVERDUE:
        found, total = _overdue(filters)
    else:
        found, total = _outbox().deliveries(**filters)
    body = {
        "total": total,
        "offset": filters["offset"],
        "count": filters["count"],
        "items": [outbox.to_json(d) for d in found],
    }
    return json_response(body)


def _overdue(filters: dict[str, Any]) -> tuple[list[Delivery], int]:
    """The newest delivery of each overdue transition (the other filters applied), oldest first, and the total."""
    store = current_app.extensions["iop_fhir.store"]
    days = current_app.config["IOP_FHIR"].transition_overdue_days
    query = {k: v for k, v in filters.items() if k in ("partner_id", "record_id")}
    kind = filters.get("record_kind", "discharge")
    if kind != "discharge":
        return [], 0
    rows, _ = store.deliveries(record_kind="discharge", **query, offset=0, count=1_000_000)
    newest: dict[str, Delivery] = {}
    for row in rows:
        if row.kind == "bundle" and row.record_id is not None:
            newest[row.record_id] = row
    now = now_us()
    overdue = []
    for record_id, row in newest.items():
        record = store.record("discharge", record_id)
        if record is not None and followup.overdue_since(record, store, days, now) is not None:
            overdue.append(row)
    overdue.sort(key=lambda r: (r.created, r.id))
    start = filters["offset"]
    return overdue[start : start + filters["count"]], len(overdue)


def get_delivery(delivery_id: str) -> Response:
    return json_response(outbox.to_json(_delivery(delivery_id)))


def retry_delivery(delivery_id: str) -> Response:
    current = _delivery(delivery_id)
    if not _outbox().retry(current.id, now_us()):
        status = _delivery(delivery_id).status
        allowed = " or ".join(RETRYABLE_BY_HAND)
        raise Conflict(f"delivery {current.id} is {status}; only {allowed} deliveries can be retried", "status")
    return json_response(outbox.to_json(_delivery(delivery_id)))


DELIVERY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "partner", "record", "kind", "status", "attempts", "created", "updated"],
    "properties": {
        "id": {"type": "string"},
        "partner": {"type": "string"},
        "record": {
            "type": "object",
            "required": ["kind", "id"],
            "properties": {"kind": {"type": "string"}, "id": {"type": "string"}},
        },
        "kind": {"type": "string", "enum": ["bundle", "notification"]},
        "status": {"type": "string", "enum": list(DELIVERY_STATUSES)},
        "attempts": {"type": "integer", "minimum": 0},
        "next_attempt": {"type": ["string", "null"], "description": "FHIR instant, while pending"},
        "last_error": {"type": ["object", "null"], "description": "status, message, the partner's OperationOutcome"},
        "payload": {"type": ["object", "null"], "description": "what is sent (types and counts, never the body)"},
        "response": {"type": ["object", "null"], "description": "summary of the partner's answer"},
        "created": {"type": "string"},
        "updated": {"type": "string"},
        "delivered_at": {"type": ["string", "null"]},
    },
}
DELIVERY_LIST_SCHEMA = web.list_of(DELIVERY_SCHEMA)

web.route(
    bp,
    "/deliveries",
    "GET",
    list_deliveries,
    "List deliveries to partners, oldest first",
    success_description="{total, offset, count, items}",
    success_schema=DELIVERY_LIST_SCHEMA,
    errors={400: "OperationOutcome: a bad query parameter"},
    parameters=_LIST_DOC,
)
web.route(
    bp,
    "/deliveries/<delivery_id>",
    "GET",
    get_delivery,
    "Read a delivery: status, attempts, next attempt, last error (with the partner's OperationOutcome)",
    success_description="the delivery",
    success_schema=DELIVERY_SCHEMA,
    errors={404: "OperationOutcome"},
)
web.route(
    bp,
    "/deliveries/<delivery_id>/retry",
    "POST",
    retry_delivery,
    "Send a dead or blocked delivery again: it becomes pending and due now, its attempts kept",
    success_description="the delivery, pending",
    success_schema=DELIVERY_SCHEMA,
    errors={404: "OperationOutcome", 409: "OperationOutcome: the delivery is not dead or blocked"},
)
