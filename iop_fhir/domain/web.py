"""What every /iop blueprint shares: JSON bodies in and out, the OperationOutcome error schema, query-string
checks and paging, and registering a route with its OpenAPI documentation."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson
from flask import Response, current_app, request
from flask_smorest import Blueprint
from marshmallow import Schema, fields

from iop_fhir.errors import BadRequest, UnsupportedMediaType

JSON = "application/json"


class OperationOutcomeIssueSchema(Schema):
    severity = fields.String(metadata={"description": "error, warning or information"})
    code = fields.String(metadata={"description": "required, structure, value, invariant, not-found, ..."})
    diagnostics = fields.String()
    expression = fields.List(fields.String(), metadata={"description": "JSON path of the field, e.g. items[2].code"})


class OperationOutcomeSchema(Schema):
    """The error body of every /iop response (documentation only)."""

    resourceType = fields.String(metadata={"enum": ["OperationOutcome"]})
    issue = fields.List(fields.Nested(OperationOutcomeIssueSchema))


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status=status, headers=headers, mimetype=JSON)


def json_body(*, optional: bool = False) -> Any:
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
    errors: Mapping[int, str] | Iterable[int] = (400, 404),
    body: type[Schema] | None = None,
    body_required: bool = True,
    parameters: list[dict[str, Any]] | None = None,
) -> None:
    """Register one operation with its OpenAPI documentation; the request body is documented here and parsed by
    the view (not by webargs, whose errors are not OperationOutcomes)."""
    documented: dict[str, Any] = {"summary": summary}
    if body is not None:
        documented["requestBody"] = {"required": body_required, "content": {JSON: {"schema": body}}}
    if parameters:
        documented["parameters"] = parameters
    view = bp.doc(**documented)(view)
    view = bp.alt_response(success, description=success_description, content_type=JSON, success=True)(view)
    described = errors if isinstance(errors, Mapping) else dict.fromkeys(errors, "OperationOutcome")
    for status, description in described.items():
        view = bp.alt_response(status, description=description, schema=OperationOutcomeSchema, content_type=JSON)(view)
    bp.add_url_rule(rule, endpoint or view.__name__, view, methods=[method])
