"""The /fhir blueprint: one view per FHIR REST interaction (https://hl7.org/fhir/R4/http.html).

Each view unpacks the request, makes one repository call and builds the response; the rules live in repository.py.
AuditEvent is read and searched in the audit log instead (auditevents.py): the read and search views hand it over.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode

from flask import Blueprint, Response, current_app, request

from iop_fhir.errors import BadRequest, NotFound, information, operation_outcome
from iop_fhir.fhir import auditevents, capability, http, searchset, transaction
from iop_fhir.fhir.history import HistoryQuery, history_bundle, history_params
from iop_fhir.fhir.repository import Repository, check_type, parse_conditional
from iop_fhir.privacy import trail
from iop_fhir.r4.instants import http_date, now_us
from iop_fhir.security import guard
from iop_fhir.store.base import StoredResource

bp = Blueprint("fhir", __name__, url_prefix="/fhir")


def repo() -> Repository:
    """The repository as the request's client sees it: its scopes and Part 2 restriction apply to every call."""
    return guard.repository()


def base_url() -> str:
    configured: str = current_app.config["IOP_FHIR"].base_url
    return configured.rstrip("/") if configured else request.host_url.rstrip("/") + "/fhir"


@bp.before_request
def _negotiate() -> None:
    http.check_format(request)


def _query_params() -> list[tuple[str, str]]:
    return [(k, v) for k, v in request.args.items(multi=True)]


def _prefer() -> str | None:
    return request.headers.get("Prefer")


@bp.get("/metadata")
def metadata() -> Response:
    return http.fhir_response(capability.capability_statement(base_url()))


@bp.post("")
@bp.post("/")
def batch_or_transaction() -> Response:
    bundle = http.json_body(request)
    if isinstance(bundle, dict) and bundle.get("type") == "batch":
        trail.named("batch")  # audited as a batch (the endpoint alone cannot tell)
    return http.fhir_response(
        transaction.process(
            repo(), bundle, base_url=base_url(), max_entries=current_app.config["IOP_FHIR"].max_bundle_entries
        )
    )


@bp.get("/_history")
def system_history() -> Response:
    return _history(None, None, "_history")


@bp.get("/<res_type>")
def search(res_type: str) -> Response:
    return _search(res_type, _query_params())


@bp.post("/<res_type>/_search")
def search_post(res_type: str) -> Response:
    if request.mimetype != "application/x-www-form-urlencoded":
        raise BadRequest(
            "POST _search takes a form (application/x-www-form-urlencoded) body",
            "Content-Type",
            code="not-supported",
        )
    body = request.get_data(as_text=True)
    return _search(res_type, _query_params() + parse_qsl(body, keep_blank_values=True))


def _search(res_type: str, params: list[tuple[str, str]]) -> Response:
    if res_type == auditevents.AUDIT_EVENT:
        return _search_audit_log(params)
    search_request, result = repo().search(res_type, params, lenient=http.lenient(_prefer()), base_url=base_url())
    return http.fhir_response(searchset.searchset_bundle(search_request, result, base_url()))


@bp.post("/<res_type>")
def create(res_type: str) -> Response:
    check_type(res_type)
    body = http.json_body(request)
    result = repo().create(res_type, body, if_none_exist=_create_condition(res_type))
    stored = result.stored
    location = f"{base_url()}/{res_type}/{stored.res_id}/_history/{stored.version_id}"
    return http.resource_response(stored, status=201 if result.created else 200, prefer=_prefer(), location=location)


def _create_condition(res_type: str) -> str | None:
    """The condition of a conditional create: ``If-None-Exist``, or the query string of ``POST Type?identifier=x``
    (the form fhirpy's get_or_create and Aidbox use). Both given must agree; a query parameter that is no search
    parameter of the type is refused by the search it becomes, so a query is never ignored."""
    header = request.headers.get("If-None-Exist")
    params = [(k, v) for k, v in _query_params() if k not in ("_format", "_pretty")]
    if not params:
        return header
    if header is not None and sorted(parse_conditional(res_type, header, header="If-None-Exist")) != sorted(params):
        raise BadRequest("If-None-Exist and the query string give different conditions", "If-None-Exist")
    return urlencode(params)


@bp.put("/<res_type>")
def conditional_update(res_type: str) -> Response:
    check_type(res_type)
    body = http.json_body(request)
    query = request.query_string.decode()
    result = repo().conditional_update(res_type, query, body, if_match=http.parse_etag(request.headers.get("If-Match")))
    return _written(res_type, result.stored, result.created)


@bp.delete("/<res_type>")
def conditional_delete(res_type: str) -> Response:
    check_type(res_type)
    deleted = repo().conditional_delete(res_type, request.query_string.decode())
    return _deleted(deleted)


@bp.get("/<res_type>/_history")
def type_history(res_type: str) -> Response:
    if res_type == auditevents.AUDIT_EVENT:
        raise BadRequest(
            "the audit log has no history of its own: each AuditEvent has one version; search AuditEvent by date",
            code="not-supported",
        )
    return _history(res_type, None, f"{res_type}/_history")


@bp.get("/<res_type>/<res_id>")
def read(res_type: str, res_id: str) -> Response:
    if res_type == auditevents.AUDIT_EVENT:
        return _read_audit_log(res_id)
    stored = repo().read(res_type, res_id)
    etag = f'W/"{stored.version_id}"'
    if request.headers.get("If-None-Match") in (etag, f'"{stored.version_id}"'):
        return http.fhir_response(None, 304, http.version_headers(stored))
    return http.resource_response(stored)


@bp.get("/<compartment>/<patient_id>/<res_type>")
def compartment_search(compartment: str, patient_id: str, res_type: str) -> Response:
    """Compartment search (https://hl7.org/fhir/R4/search.html#2.21.1.2): ``Patient/{id}/{type}?params``."""
    if compartment != "Patient":
        check_type(compartment)
        raise NotFound(f"only the Patient compartment can be searched, not {compartment}", code="not-supported")
    check_type(res_type)
    search_request, result = repo().compartment_search(
        patient_id, res_type, _query_params(), lenient=http.lenient(_prefer()), base_url=base_url()
    )
    path = f"Patient/{patient_id}/{res_type}"
    return http.fhir_response(searchset.searchset_bundle(search_request, result, base_url(), path=path))


@bp.put("/<res_type>/<res_id>")
def update(res_type: str, res_id: str) -> Response:
    check_type(res_type)
    body = http.json_body(request)
    result = repo().update(res_type, res_id, body, if_match=http.parse_etag(request.headers.get("If-Match")))
    return _written(res_type, result.stored, result.created)


@bp.patch("/<res_type>/<res_id>")
def patch(res_type: str, res_id: str) -> Response:
    check_type(res_type)
    operations = http.json_body(request, patch=True)
    if_match = http.parse_etag(request.headers.get("If-Match"))
    result = repo().patch(res_type, res_id, operations, if_match=if_match, merge=http.is_merge_patch(request))
    return _written(res_type, result.stored, result.created)


@bp.patch("/<res_type>")
def conditional_patch(res_type: str) -> Response:
    check_type(res_type)
    operations = http.json_body(request, patch=True)
    result = repo().conditional_patch(
        res_type,
        request.query_string.decode(),
        operations,
        if_match=http.parse_etag(request.headers.get("If-Match")),
        merge=http.is_merge_patch(request),
    )
    return _written(res_type, result.stored, result.created)


@bp.delete("/<res_type>/<res_id>")
def delete(res_type: str, res_id: str) -> Response:
    return _deleted(repo().delete(res_type, res_id))


@bp.get("/<res_type>/<res_id>/_history")
def instance_history(res_type: str, res_id: str) -> Response:
    if res_type == auditevents.AUDIT_EVENT:
        stored = _audit_event(res_id)
        return http.fhir_response(
            history_bundle(
                [stored],
                1,
                base_url=base_url(),
                path=f"{res_type}/{res_id}/_history",
                query=HistoryQuery([], 1),
                snapshot=now_us(),
            )
        )
    return _history(res_type, res_id, f"{res_type}/{res_id}/_history")


@bp.get("/<res_type>/<res_id>/_history/<version>")
def vread(res_type: str, res_id: str, version: str) -> Response:
    if res_type == auditevents.AUDIT_EVENT:
        stored = _audit_event(res_id)
        if version != "1":  # an AuditEvent is written once: version 1 is its only one
            raise NotFound(f"{res_type}/{res_id[:80]} has no version {version[:20]!r}")
        return http.fhir_response(stored.content, 200, {"Last-Modified": http_date(stored.last_updated)})
    return http.resource_response(repo().vread(res_type, res_id, version))


@bp.post("/<res_type>/$validate")
@bp.post("/<res_type>/<res_id>/$validate")
def validate(res_type: str, res_id: str | None = None) -> Response:
    """$validate (https://hl7.org/fhir/R4/resource-operation-validate.html): always 200 with the issues found."""
    check_type(res_type)
    body = http.json_body(request)
    profile = request.args.get("profile")
    if isinstance(body, dict) and body.get("resourceType") == "Parameters":
        body, profile = _validate_parameter(body), _profile_parameter(body) or profile
    issues = repo().validation_issues(res_type, body, res_id, profile=profile)
    outcome = operation_outcome(issues) if issues else information("No issues found")
    return http.fhir_response(outcome)


def _validate_parameter(parameters: dict[str, Any]) -> Any:
    listed = parameters.get("parameter")
    for p in listed if isinstance(listed, list) else ():
        if isinstance(p, dict) and p.get("name") == "resource":
            return p.get("resource")
    raise BadRequest("$validate Parameters need a 'resource' parameter", "Parameters.parameter")


def _profile_parameter(parameters: dict[str, Any]) -> str | None:
    listed = parameters.get("parameter")
    for p in listed if isinstance(listed, list) else ():
        if isinstance(p, dict) and p.get("name") == "profile":
            value = p.get("valueUri", p.get("valueCanonical"))
            return value if isinstance(value, str) else None
    return None


def _read_audit_log(res_id: str) -> Response:
    stored = _audit_event(res_id)
    return http.fhir_response(stored.content, 200, {"Last-Modified": http_date(stored.last_updated)})


def _audit_event(res_id: str) -> StoredResource:
    """The AuditEvent of one audit row (its read, vread and history), audited as read."""
    store, writer = current_app.extensions["iop_fhir.store"], current_app.extensions["iop_fhir.audit"]
    body, row = auditevents.read(guard.access(), store, writer, res_id)
    guard.audited([f"{auditevents.AUDIT_EVENT}/{row.id}"])
    return StoredResource(auditevents.AUDIT_EVENT, row.id, 1, row.recorded, False, body, "POST")


def _search_audit_log(params: list[tuple[str, str]]) -> Response:
    settings = current_app.config["IOP_FHIR"]
    store, writer = current_app.extensions["iop_fhir.store"], current_app.extensions["iop_fhir.audit"]
    body, rows = auditevents.search_bundle(
        guard.access(),
        store,
        writer,
        params,
        lenient=http.lenient(_prefer()),
        base_url=base_url(),
        default_count=settings.default_page_size,
        max_count=settings.max_page_size,
    )
    guard.audited([f"{auditevents.AUDIT_EVENT}/{row.id}" for row in rows])
    return http.fhir_response(body)


def _written(res_type: str, stored: Any, created: bool) -> Response:
    location = f"{base_url()}/{res_type}/{stored.res_id}/_history/{stored.version_id}"
    return http.resource_response(
        stored, status=201 if created else 200, prefer=_prefer(), location=location if created else None
    )


def _deleted(deleted: Any) -> Response:
    headers = {"ETag": f'W/"{deleted.version_id}"'} if deleted is not None else {}
    return http.fhir_response(None, 204, headers)


def _history(res_type: str | None, res_id: str | None, path: str) -> Response:
    query = history_params(
        _query_params(),
        default_count=current_app.config["IOP_FHIR"].default_page_size,
        max_count=current_app.config["IOP_FHIR"].max_page_size,
    )
    # Every page of a paging holds the versions written by its first page's time: the total stays what it was.
    snapshot = query.cursor.snapshot if query.cursor is not None else now_us()
    at = snapshot if query.at is None else min(query.at, snapshot)
    versions, total = repo().history(
        res_type, res_id, since=query.since, at=at, count=query.count, offset=query.offset, after=query.cursor
    )
    return http.fhir_response(
        history_bundle(versions, total, base_url=base_url(), path=path, query=query, snapshot=snapshot)
    )
