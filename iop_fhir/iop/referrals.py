"""/iop/referrals: inbound referrals (made from referral Tasks posted to /fhir) and the staff decisions on them:
accept, decline, no-show, admit. Each route parses its body and makes one call to exchange/referrals.py."""

from __future__ import annotations

from typing import Any

from flask import Response, current_app, request
from flask_smorest import Blueprint
from marshmallow import Schema, ValidationError

from iop_fhir.errors import BadRequest, Invalid, Issue, NotFound
from iop_fhir.exchange.referrals import STATUSES, ReferralService
from iop_fhir.fhir.views import base_url
from iop_fhir.iop import schemas, web
from iop_fhir.iop.web import json_response

PARAMETERS = ("status", "offset", "count")

bp = Blueprint(
    "referrals",
    __name__,
    url_prefix="/iop",
    description="Inbound referrals (application/json) and the decisions that close the loop with the referrer.",
)


class AcceptSchema(schemas.RecordSchema):
    planned_admission = schemas.Date(required=True, metadata={"description": "the day the patient is expected"})


class DeclineSchema(schemas.RecordSchema):
    reason = schemas.Text(required=True, metadata={"description": "why; the referrer sees it as Task.statusReason"})


class NoShowSchema(schemas.RecordSchema):
    """No fields: the planned admission date is already known."""


class AdmitSchema(schemas.RecordSchema):
    enrollment = schemas.Object(
        schemas.EnrollmentSchema,
        required=True,
        metadata={
            "description": "an enrollment record; patient, diagnoses and referral default to the referral's, and "
            "referral.service_request is always the referral's ServiceRequest"
        },
    )


_ACCEPT, _DECLINE, _NO_SHOW = AcceptSchema(), DeclineSchema(), NoShowSchema()


def _service() -> ReferralService:
    return ReferralService(current_app.extensions["iop_fhir.repository"], current_app.extensions["iop_fhir.records"])


def _load(schema: Schema, payload: Any, what: str) -> dict[str, Any]:
    if not isinstance(payload, dict):
        found = schemas.json_type(payload)
        raise Invalid([Issue("structure", f"the body must be a JSON object ({what}), got {found}")])
    try:
        loaded: dict[str, Any] = schema.load(payload)
    except ValidationError as error:
        raise Invalid(schemas.issues(error.messages)) from None
    return loaded


def _referral_id(referral_id: str) -> str:
    if not schemas.FHIR_ID.fullmatch(referral_id):
        raise NotFound(f"there is no referral with id {referral_id[:80]!r}", "id")
    return referral_id


def list_referrals() -> Response:
    web.check_parameters(PARAMETERS)
    status = request.args.get("status")
    if status is not None and status not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}, got {status[:40]!r}", "status")
    offset, count = web.paging()
    return json_response(_service().list_referrals(status=status, offset=offset, count=count))


def get_referral(referral_id: str) -> Response:
    return json_response(_service().get(_referral_id(referral_id)))


def accept_referral(referral_id: str) -> Response:
    body = _load(_ACCEPT, web.json_body(), "an acceptance")
    return json_response(_service().accept(_referral_id(referral_id), body["planned_admission"], base_url()))


def decline_referral(referral_id: str) -> Response:
    body = _load(_DECLINE, web.json_body(), "a decline")
    return json_response(_service().decline(_referral_id(referral_id), body["reason"], base_url()))


def no_show_referral(referral_id: str) -> Response:
    _load(_NO_SHOW, web.json_body(optional=True) or {}, "a no-show")
    return json_response(_service().no_show(_referral_id(referral_id), base_url()))


def admit_referral(referral_id: str) -> Response:
    payload = web.json_body()
    if not isinstance(payload, dict):
        raise Invalid([Issue("structure", f"the body must be a JSON object, got {schemas.json_type(payload)}")])
    unknown = sorted(set(payload) - {"enrollment"})
    if unknown:
        raise Invalid(
            [Issue("structure", "unknown field; allowed fields: enrollment", schemas.field_path("", unknown[0]))]
        )
    enrollment = payload.get("enrollment")
    if not isinstance(enrollment, dict):
        code, text = ("required", "required field is missing") if enrollment is None else ("structure", "")
        text = text or f"must be a JSON object (an enrollment record), got {schemas.json_type(enrollment)}"
        raise Invalid([Issue(code, text, "enrollment")])
    return json_response(_service().admit(_referral_id(referral_id), enrollment, base_url()))


_LIST_DOC = [
    {"in": "query", "name": "status", "schema": {"type": "string", "enum": list(STATUSES)}},
    {"in": "query", "name": "offset", "schema": {"type": "integer", "minimum": 0}},
    {"in": "query", "name": "count", "schema": {"type": "integer", "minimum": 0}},
]
REFERRAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "status", "patient", "service_request", "task", "fhir", "meta"],
    "properties": {
        "id": {"type": "string"},
        "status": {"type": "string", "description": "requested, accepted, declined, no-show or admitted"},
        "patient": {"type": "object", "description": "reverse-mapped, in the shape of an enrollment's patient"},
        "diagnoses": {"type": "array", "items": {"type": "object"}},
        "service": {"type": ["string", "null"]},
        "requested_start": {"type": ["string", "null"]},
        "authored_on": {"type": ["string", "null"]},
        "referring": {"type": "object", "description": "organization (display) and partner (id) of the referrer"},
        "notes": {"type": "array", "items": {"type": "string"}},
        "service_request": {"type": "string"},
        "task": {"type": "string"},
        "fhir": {"type": "array", "items": {"type": "string"}},
        "meta": {"type": "object"},
    },
}
REFERRAL_LIST_SCHEMA = web.list_of(REFERRAL_SCHEMA)
_ACTION_ERRORS = {
    400: "OperationOutcome: the body is not valid",
    404: "OperationOutcome",
    409: "OperationOutcome: not allowed in the referral's current status",
    415: "OperationOutcome",
}


web.route(
    bp,
    "/referrals",
    "GET",
    list_referrals,
    "List inbound referrals, oldest first",
    success_description="{total, offset, count, items}",
    success_schema=REFERRAL_LIST_SCHEMA,
    errors={400: "OperationOutcome: a bad query parameter"},
    parameters=_LIST_DOC,
)
web.route(
    bp,
    "/referrals/<referral_id>",
    "GET",
    get_referral,
    "Read a referral",
    success_description="the referral",
    success_schema=REFERRAL_SCHEMA,
    errors={404: "OperationOutcome"},
)
web.route(
    bp,
    "/referrals/<referral_id>/accept",
    "POST",
    accept_referral,
    "Accept a referral with a planned admission date (again: reschedule); Task accepted, BSeR 3.0",
    success_description="the referral",
    success_schema=REFERRAL_SCHEMA,
    errors=_ACTION_ERRORS,
    body=AcceptSchema,
)
web.route(
    bp,
    "/referrals/<referral_id>/decline",
    "POST",
    decline_referral,
    "Decline a referral with a reason; Task rejected, BSeR 4.0",
    success_description="the referral",
    success_schema=REFERRAL_SCHEMA,
    errors=_ACTION_ERRORS,
    body=DeclineSchema,
)
web.route(
    bp,
    "/referrals/<referral_id>/no-show",
    "POST",
    no_show_referral,
    "The patient did not come on the planned admission date; Task failed, BSeR 5.1.2",
    success_description="the referral",
    success_schema=REFERRAL_SCHEMA,
    errors=_ACTION_ERRORS,
    body=NoShowSchema,
    body_required=False,
)
web.route(
    bp,
    "/referrals/<referral_id>/admit",
    "POST",
    admit_referral,
    "Admit the patient: records the enrollment and completes the Task with its EpisodeOfCare; BSeR 7.0",
    success_description="the referral",
    success_schema=REFERRAL_SCHEMA,
    errors={**_ACTION_ERRORS, 422: "OperationOutcome: the enrollment is refused"},
    body=AdmitSchema,
)
