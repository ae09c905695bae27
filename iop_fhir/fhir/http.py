"""HTTP details of the FHIR REST API: media types, request bodies, ETag/If-Match, Prefer, response building.

https://hl7.org/fhir/R4/http.html
"""

from __future__ import annotations

from typing import Any

import orjson
from flask import Request, Response

from iop_fhir.errors import BadRequest, NotAcceptable, UnsupportedMediaType, information
from iop_fhir.fhir.repository import version_from_etag
from iop_fhir.jsonkeys import duplicate_key
from iop_fhir.r4.instants import http_date
from iop_fhir.store.base import StoredResource

FHIR_JSON = "application/fhir+json"
JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"  # RFC 7396; a PATCH with application/json is one too (fhirpy's)
RESPONSE_TYPE = f"{FHIR_JSON}; charset=utf-8"
_JSON_TYPES = (FHIR_JSON, "application/json", "application/json+fhir", "text/json")
_FORMATS = {"json", "application/json", "application/fhir+json", "application/json+fhir", "text/json"}


def check_format(request: Request) -> None:
    """Only JSON is served: ``_format`` or an Accept header that rules JSON out gets 406. Also the first reader
    of the query string: one that is not UTF-8 gets 400 (werkzeug raises UnicodeDecodeError on it)."""
    try:
        fmt = request.args.get("_format")
    except UnicodeDecodeError:
        raise BadRequest("the query string is not UTF-8 (percent-encode the UTF-8 bytes of a value)", "query") from None
    if fmt is not None and fmt.split(";")[0].strip() not in _FORMATS:
        raise NotAcceptable(f"_format '{fmt}' is not supported; this server speaks application/fhir+json", "_format")
    accept = request.headers.get("Accept")
    if accept and not fmt:
        types = [part.split(";")[0].strip() for part in accept.split(",")]
        if not any(t in _JSON_TYPES or t in ("*/*", "application/*") for t in types):
            raise NotAcceptable(f"cannot answer in {accept}; this server speaks application/fhir+json", "Accept")


def json_body(request: Request, *, patch: bool = False) -> Any:
    """The parsed JSON body; 415 for another media type, 400 for malformed JSON."""
    mimetype = request.mimetype
    allowed = (JSON_PATCH, MERGE_PATCH, "application/json") if patch else _JSON_TYPES
    if mimetype not in allowed:
        shown = mimetype or "none"
        raise UnsupportedMediaType(
            f"Content-Type {shown} is not supported here; send {' or '.join(allowed[:2])}", "Content-Type"
        )
    data = request.get_data(cache=False)
    if not data.strip():
        raise BadRequest("the request body is empty", "body", code="structure")
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", "body", code="structure") from exc
    duplicated = duplicate_key(data)
    if duplicated is not None:
        raise BadRequest(
            f"the key '{duplicated.rpartition('.')[2]}' appears twice in one object at {duplicated}; FHIR JSON "
            "forbids duplicate keys",
            duplicated,
            code="structure",
        )
    return parsed


def is_merge_patch(request: Request) -> bool:
    """Whether a PATCH body is a JSON Merge Patch (RFC 7396) rather than a JSON Patch (RFC 6902)."""
    return request.mimetype != JSON_PATCH


def parse_etag(value: str | None, header: str = "If-Match") -> int | None:
    """``W/"3"`` or ``"3"`` -> 3 (https://hl7.org/fhir/R4/http.html#concurrency)."""
    if value is None or not value.strip():
        return None
    version = version_from_etag(value)
    if version is None:
        raise BadRequest(f"{header} '{value[:100]}' is not a version ETag such as W/\"1\"", header)
    return version


def version_headers(stored: StoredResource) -> dict[str, str]:
    return {"ETag": f'W/"{stored.version_id}"', "Last-Modified": http_date(stored.last_updated)}


def fhir_response(
    body: bytes | dict[str, Any] | None, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    if isinstance(body, dict):
        body = orjson.dumps(body)
    response = Response(body or b"", status=status, headers=headers or {})
    if body:
        response.content_type = RESPONSE_TYPE
    else:  # an empty answer has no media type (not Flask's default text/html)
        del response.headers["Content-Type"]
    return response


def resource_response(
    stored: StoredResource,
    *,
    status: int = 200,
    prefer: str | None = None,
    location: str | None = None,
) -> Response:
    """A resource with its version headers, honouring ``Prefer: return=…`` on writes."""
    headers = version_headers(stored)
    if location:
        headers["Location"] = location
    wanted = _preferences(prefer).get("return", "representation")
    if wanted == "minimal":
        return fhir_response(None, status, headers)
    if wanted == "OperationOutcome":
        return fhir_response(information("ok"), status, headers)
    return fhir_response(stored.content, status, headers)


def _preferences(prefer: str | None) -> dict[str, str]:
    """The ``name=value`` preferences of a Prefer header (RFC 7240), e.g. ``return=minimal; handling=lenient``."""
    preferences: dict[str, str] = {}
    for part in (prefer or "").replace(";", ",").split(","):
        name, _, value = part.partition("=")
        if name.strip():
            preferences.setdefault(name.strip(), value.strip().strip('"'))
    return preferences


def lenient(prefer: str | None) -> bool:
    """``Prefer: handling=lenient`` (https://hl7.org/fhir/R4/search.html#errors)."""
    return _preferences(prefer).get("handling") == "lenient"
