"""What every /iop blueprint shares: JSON bodies in and out, the OperationOutcome error schema, query-string
checks and paging, and registering a route with its OpenAPI documentation."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson
from flask import Response, current_app, request
from flask_smorest import Blueprint
from marshmallow import INCLUDE, Schema, fields, validate

from iop_fhir.errors import BadRequest, UnsupportedMediaType
from iop_fhir.jsonkeys import duplicate_key
from iop_fhir.privacy import trail

JSON = "application/json"


class OperationOutcomeIssueSchema(Schema):
    severity = fields.String(required=True, validate=validate.OneOf(["fatal", "error", "warning", "information"]))
    code = fields.String(
        required=True, metadata={"description": "an IssueType code: required, structure, value, not-found, ..."}
    )
    diagnostics = fields.String()
    expression = fields.List(fields.String(), metadata={"description": "JSON path of the field, e.g. items[2].code"})


class OperationOutcomeSchema(Schema):
    """The error body of every /iop response and of FHIR errors (documentation only)."""

    resourceType = fields.String(required=True, validate=validate.OneOf(["OperationOutcome"]))
    issue = fields.List(fields.Nested(OperationOutcomeIssueSchema), required=True, validate=validate.Length(min=1))


class RecordMetaSchema(Schema):
    kind = fields.String(required=True)
    status = fields.String(required=True, metadata={"description": "active or entered-in-error (or revoked)"})
    version = fields.Integer(required=True)
    created = fields.String(required=True, metadata={"description": "FHIR instant"})
    updated = fields.String(required=True, metadata={"description": "FHIR instant"})


_RECORD_SCHEMAS: dict[type[Schema], type[Schema]] = {}


def record_schema(schema: type[Schema]) -> type[Schema]:
    """The record as the service returns it: the fields of its request schema, and the members the service adds
    (id, the FHIR resources it maps to, meta, warnings; per kind more, e.g. a discharge's transition)."""
    if schema not in _RECORD_SCHEMAS:
        declared = {name: field for name, field in schema._declared_fields.items()}
        added = {
            "id": fields.String(required=True),
            "fhir": fields.List(
                fields.String(), required=True, metadata={"description": "references of the FHIR resources"}
            ),
            "meta": fields.Nested(RecordMetaSchema, required=True),
            "warnings": fields.List(fields.Nested(OperationOutcomeIssueSchema)),
        }
        name = schema.__name__.removesuffix("Schema") + "RecordSchema"
        _RECORD_SCHEMAS[schema] = type(
            name, (Schema,), {**declared, **added, "Meta": type("Meta", (), {"unknown": INCLUDE})}
        )
    return _RECORD_SCHEMAS[schema]


def list_schema(item: type[Schema]) -> type[Schema]:
    """`{total, offset, count, items}` of a list endpoint."""
    name = item.__name__.removesuffix("Schema") + "ListSchema"
    members = {
        "total": fields.Integer(required=True),
        "offset": fields.Integer(required=True),
        "count": fields.Integer(required=True),
        "items": fields.List(fields.Nested(item), required=True),
    }
    return type(name, (Schema,), members)


def list_of(item: dict[str, Any]) -> dict[str, Any]:
    """`{total, offset, count, items}` of a list endpoint whose items are documented as a JSON schema."""
    return {
        "type": "object",
        "required": ["total", "offset", "count", "items"],
        "properties": {
            "total": {"type": "integer"},
            "offset": {"type": "integer"},
            "count": {"type": "integer"},
            "items": {"type": "array", "items": item},
        },
    }


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """The /iop answer; the FHIR resources it names (a record's, or those of a page of records) are noted in the
    request's audit trail, as what the record service returned."""
    trail.returned_record(body)
    return Response(orjson.dumps(body), status=status, headers=headers, mimetype=JSON)


def json_body(*, optional: bool = False) -> Any:
    """The parsed body: 415 unless application/json, 400 if empty (unless optional), not JSON, or naming a key twice
    in one object (which value was meant is unknowable, so neither is taken)."""
    data = request.get_data(cache=False)
    if optional and not data.strip():
        return None
    if request.mimetype != JSON:
        shown = request.mimetype or "none"
        raise UnsupportedMediaType(f"Content-Type {shown} is not supported here; send {JSON}", "Content-Type")
    if not data.strip():
        raise BadRequest("the request body is empty; send the record as a JSON object", code="structure")
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="structure") from None
    duplicated = duplicate_key(data)
    if duplicated is not None:
        field = duplicated.removeprefix("$.")
        raise BadRequest(
            f"the key '{duplicated.rpartition('.')[2]}' appears twice in one object at {field}; a record's JSON "
            "must name each field once",
            field,
            code="structure",
        )
    return parsed


_NUMBER = re.compile(r"[0-9]{1,18}")


def check_parameters(allowed: Iterable[str]) -> None:
    """Refuse an unknown or repeated parameter (400 naming it), and a query string that is not UTF-8."""
    allowed = tuple(allowed)
    try:
        names = list(request.args)
    except UnicodeDecodeError:
        raise BadRequest("the query string is not UTF-8 (percent-encode the UTF-8 bytes of a value)", "query") from None
    for name in names:
        if name not in allowed:
            raise BadRequest(f"unknown query parameter {name[:40]!r}; allowed: {', '.join(allowed)}", name or "query")
        if len(request.args.getlist(name)) > 1:
            raise BadRequest(f"{name} is given more than once", name)


def integer(name: str, default: int, maximum: int | None = None) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not _NUMBER.fullmatch(raw):
        raise BadRequest(f"{name} must be a non-negative integer, got {raw[:40]!r}", name)
    value = int(raw)
    if maximum is not None and value > maximum:
        raise BadRequest(f"{name} must be at most {maximum}, got {value}", name)
    return value


def paging() -> tuple[int, int]:
    """`offset` and `count` (default and maximum from the settings)."""
    settings = current_app.config["IOP_FHIR"]
    return integer("offset", 0), integer("count", settings.default_page_size, settings.max_page_size)


def route(
    bp: Blueprint,
    rule: str,
    method: str,
    view: Callable[..., Response],
    summary: str,
    *,
    endpoint: str | None = None,
    success: int = 200,
    success_description: str = "the record (JSON)",
    success_schema: type[Schema] | dict[str, Any] | None = None,
    also: Mapping[int, str] | None = None,
    errors: Mapping[int, str] | Iterable[int] = (400, 404),
    body: type[Schema] | None = None,
    body_required: bool = True,
    parameters: list[dict[str, Any]] | None = None,
    success_content_type: str = JSON,
) -> None:
    """Register one operation with its OpenAPI documentation; the request body is documented here and parsed by
    the view (not by webargs, whose errors are not OperationOutcomes). ``success_content_type``: the media type of
    a successful answer (a rendering such as text/html), JSON unless said."""
    documented: dict[str, Any] = {"summary": summary}
    if body is not None:
        documented["requestBody"] = {"required": body_required, "content": {JSON: {"schema": body}}}
    if parameters:
        documented["parameters"] = parameters
    view = bp.doc(**documented)(view)
    view = bp.alt_response(
        success, description=success_description, schema=success_schema, content_type=success_content_type, success=True
    )(view)
    for status, description in (also or {}).items():
        view = bp.alt_response(status, description=description, schema=success_schema, content_type=JSON)(view)
    described = errors if isinstance(errors, Mapping) else dict.fromkeys(errors, "OperationOutcome")
    for status, description in described.items():
        view = bp.alt_response(status, description=description, schema=OperationOutcomeSchema, content_type=JSON)(view)
    bp.add_url_rule(rule, endpoint or view.__name__, view, methods=[method])
