"""The /iop blueprint: per record kind, routes that parse the request (schemas.load) and call one service function.

Request and response bodies are application/json; errors are OperationOutcomes (app.py renders them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from flask import Response, request, url_for
from flask_smorest import Api, Blueprint
from marshmallow import Schema, fields

from iop_fhir.domain import query, schemas, service
from iop_fhir.errors import BadRequest, Invalid, Issue, NotFound, UnsupportedMediaType

JSON = "application/json"
LIST_PARAMETERS = ("enrollment", "offset", "count")

bp = Blueprint(
    "iop",
    __name__,
    url_prefix="/iop",
    description="IOP records (application/json); each record is mapped to FHIR resources served under /fhir.",
)


class OperationOutcomeIssueSchema(Schema):
    severity = fields.String(metadata={"description": "error, warning or information"})
    code = fields.String(metadata={"description": "required, structure, value, invariant, not-found, ..."})
    diagnostics = fields.String()
    expression = fields.List(fields.String(), metadata={"description": "JSON path of the field, e.g. items[2].code"})


class OperationOutcomeSchema(Schema):
    """The error body of every /iop response (documentation only)."""

    resourceType = fields.String(metadata={"enum": ["OperationOutcome"]})
    issue = fields.List(fields.Nested(OperationOutcomeIssueSchema))


class IopApi(Api):  # type: ignore[misc]
    """flask-smorest's Api documenting errors as OperationOutcomes and leaving error rendering to the app."""

    ERROR_SCHEMA = OperationOutcomeSchema

    def _register_error_handlers(self) -> None:
        """The app's own handlers (app.py) turn every error into an OperationOutcome."""


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status=status, headers=headers, mimetype=JSON)


def _json_body(*, optional: bool = False) -> Any:
    """The parsed body: 415 unless application/json, 400 if empty (unless optional) or not JSON."""
    data = request.get_data(cache=False)
    if optional and not data.strip():
        return None
    if request.mimetype != JSON:
        shown = request.mimetype or "none"
        raise UnsupportedMediaType(f"Content-Type {shown} is not supported here; send {JSON}", "Content-Type")
    if not data.strip():
        raise BadRequest("the request body is empty; send the record as a JSON object", code="structure")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="structure") from None


def _list_query() -> tuple[str | None, int, int]:
    query.check_parameters(LIST_PARAMETERS)
    enrollment = request.args.get("enrollment")
    if enrollment is not None and not schemas.FHIR_ID.fullmatch(enrollment):
        raise BadRequest(f"enrollment must be an enrollment id, got {enrollment[:80]!r}", "enrollment")
    offset, count = query.paging()
    return enrollment, offset, count


def _record_id(kind: str, record_id: str) -> str:
    # Record ids are FHIR ids; anything else names no record (and could not even be compared on PostgreSQL).
    if not schemas.FHIR_ID.fullmatch(record_id):
        raise NotFound(f"there is no {kind} record with id {record_id[:80]!r}", "id")
    return record_id


# Members the service adds to a record it returns; a client may PUT a record it read without removing them.
READ_ONLY = ("fhir", "meta", "warnings", "transition")


def _load_for_update(kind: str, record_id: str) -> dict[str, Any]:
    body = _json_body()
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in READ_ONLY}
        if kind != "partner" and "id" in body:
            if body["id"] != record_id:
                raise Invalid([Issue("invariant", f"must equal the id in the URL ({record_id})", "id")])
            del body["id"]
    payload = schemas.load(kind, body)
    # A partner's id is in its body: a PUT may not move it to another id.
    if "id" in payload and payload["id"] != record_id:
        raise Invalid([Issue("invariant", f"must equal the id in the URL ({record_id})", "id")])
    return payload


_OUTCOME = {"schema": OperationOutcomeSchema, "content_type": JSON}


_LIST_QUERY_DOC = [
    {"in": "query", "name": "enrollment", "schema": {"type": "string"}, "description": "an enrollment id"},
    {"in": "query", "name": "offset", "schema": {"type": "integer", "minimum": 0}},
    {"in": "query", "name": "count", "schema": {"type": "integer", "minimum": 0}},
]


def _route(
    rule: str,
    method: str,
    endpoint: str,
    view: Callable[..., Response],
    summary: str,
    *,
    body: type[Schema] | None = None,
    body_required: bool = True,
    success: int = 200,
    errors: tuple[int, ...] = (400, 404),
    parameters: list[dict[str, Any]] | None = None,
) -> None:
    """Register one operation with its OpenAPI documentation; the request body is documented here and parsed by
    schemas.load in the view (not by webargs, whose errors are not OperationOutcomes)."""
    documented: dict[str, Any] = {"summary": summary}
    if body is not None:
        documented["requestBody"] = {"required": body_required, "content": {JSON: {"schema": body}}}
    if parameters:
        documented["parameters"] = parameters
    view = bp.doc(**documented)(view)
    view = bp.alt_response(success, description="the record (JSON)", content_type=JSON, success=True)(view)
    for status in errors:
        view = bp.alt_response(status, description="OperationOutcome", **_OUTCOME)(view)
    bp.add_url_rule(rule, endpoint, view, methods=[method])


def _register(kind: str, *, retractable: bool = True) -> None:
    plural = schemas.PLURALS[kind]
    schema = schemas.SCHEMAS[kind]
    title = kind.replace("-", " ")

    def create() -> Response:
        body, created = service.create(kind, schemas.load(kind, _json_body()))
        headers = {}
        if created and isinstance(body.get("id"), str):
            headers["Location"] = url_for(f"iop.get_{kind}", record_id=body["id"])
        return json_response(body, 201 if created else 200, headers)

    def list_records() -> Response:
        enrollment, offset, count = _list_query()
        return json_response(service.list_records(kind, enrollment_id=enrollment, offset=offset, count=count))

    def get(record_id: str) -> Response:
        return json_response(service.get(kind, _record_id(kind, record_id)))

    def update(record_id: str) -> Response:
        record_id = _record_id(kind, record_id)
        return json_response(service.update(kind, record_id, _load_for_update(kind, record_id)))

    def retract(record_id: str) -> Response:
        record_id = _record_id(kind, record_id)
        reason = schemas.load_retraction(_json_body(optional=True))
        return json_response(service.retract(kind, record_id, reason))

    collection, one = f"/{plural}", f"/{plural}/<record_id>"
    _route(
        collection,
        "POST",
        f"create_{kind}",
        create,
        f"Record a {title}",
        body=schema,
        success=201,
        errors=(400, 409, 415, 422),
    )
    _route(
        collection,
        "GET",
        f"list_{kind}",
        list_records,
        f"List {title} records, oldest first",
        errors=(400,),
        parameters=_LIST_QUERY_DOC,
    )
    _route(one, "GET", f"get_{kind}", get, f"Read a {title} record")
    _route(
        one, "PUT", f"update_{kind}", update, f"Replace a {title} record", body=schema, errors=(400, 404, 409, 415, 422)
    )
    if retractable:
        _route(
            f"{one}/retract",
            "POST",
            f"retract_{kind}",
            retract,
            f"Retract a {title} record entered in error",
            body=schemas.RetractionSchema,
            body_required=False,
            errors=(400, 404, 409, 415),
        )


for _kind in schemas.KINDS:
    _register(_kind, retractable=_kind != "partner")
