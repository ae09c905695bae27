"""The /iop blueprint: per record kind, routes that parse the request (schemas.load) and call one service function.

Request and response bodies are application/json (the discharge summary: text/html or application/pdf); errors are
OperationOutcomes (app.py renders them).
"""

from __future__ import annotations

from typing import Any

from flask import Response, current_app, request, url_for
from flask_smorest import Api, Blueprint

from iop_fhir.errors import BadRequest, Invalid, Issue, NotFound
from iop_fhir.iop import outcomes, schemas, service, summaries, summary, web
from iop_fhir.iop.web import OperationOutcomeSchema, json_response
from iop_fhir.outcomes import page
from iop_fhir.privacy import accounting

LIST_PARAMETERS = ("enrollment", "offset", "count")

bp = Blueprint(
    "iop",
    __name__,
    url_prefix="/iop",
    description="IOP records (application/json); each record is mapped to FHIR resources served under /fhir.",
)


class IopApi(Api):  # type: ignore[misc]
    """flask-smorest's Api documenting errors as OperationOutcomes and leaving error rendering to the app."""

    ERROR_SCHEMA = OperationOutcomeSchema
    # Each operation lists the errors it can answer with; no catch-all "default" response.
    DEFAULT_ERROR_RESPONSE_NAME = None

    def _register_error_handlers(self) -> None:
        """The app's own handlers (app.py) turn every error into an OperationOutcome."""


def _list_query() -> tuple[str | None, int, int]:
    web.check_parameters(LIST_PARAMETERS)
    enrollment = request.args.get("enrollment")
    if enrollment is not None and not schemas.FHIR_ID.fullmatch(enrollment):
        raise BadRequest(f"enrollment must be an enrollment id, got {enrollment[:80]!r}", "enrollment")
    offset, count = web.paging()
    return enrollment, offset, count


def _record_id(kind: str, record_id: str) -> str:
    # Record ids are FHIR ids; anything else names no record (and could not even be compared on PostgreSQL).
    if not schemas.FHIR_ID.fullmatch(record_id):
        raise NotFound(f"there is no {kind} record with id {record_id[:80]!r}", "id")
    return record_id


# Members the service adds to a record it returns; a client may PUT a record it read without removing them.
READ_ONLY = ("fhir", "meta", "warnings", "transition")


def _load_for_update(kind: str, record_id: str) -> dict[str, Any]:
    body = web.json_body()
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


_LIST_QUERY_DOC = [
    {"in": "query", "name": "enrollment", "schema": {"type": "string"}, "description": "an enrollment id"},
    {"in": "query", "name": "offset", "schema": {"type": "integer", "minimum": 0}},
    {"in": "query", "name": "count", "schema": {"type": "integer", "minimum": 0}},
]


def _register(kind: str, *, retractable: bool = True) -> None:
    plural = schemas.PLURALS[kind]
    schema = schemas.SCHEMAS[kind]
    title = kind.replace("-", " ")
    record = web.record_schema(schema)

    def create() -> Response:
        body, created = service.create(kind, schemas.load(kind, web.json_body()))
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
        reason = schemas.load_retraction(web.json_body(optional=True))
        return json_response(service.retract(kind, record_id, reason))

    collection, one = f"/{plural}", f"/{plural}/<record_id>"
    web.route(
        bp,
        collection,
        "POST",
        create,
        f"Record a {title}",
        endpoint=f"create_{kind}",
        body=schema,
        success=201,
        success_description="the record, recorded",
        success_schema=record,
        also={200: "the same record was already recorded (same id and content): nothing changed"},
        errors=(400, 409, 415, 422),
    )
    web.route(
        bp,
        collection,
        "GET",
        list_records,
        f"List {title} records, oldest first",
        endpoint=f"list_{kind}",
        success_description="`{total, offset, count, items}`",
        success_schema=web.list_schema(record),
        errors=(400,),
        parameters=_LIST_QUERY_DOC,
    )
    web.route(bp, one, "GET", get, f"Read a {title} record", endpoint=f"get_{kind}", success_schema=record)
    web.route(
        bp,
        one,
        "PUT",
        update,
        f"Replace a {title} record",
        endpoint=f"update_{kind}",
        body=schema,
        success_schema=record,
        errors=(400, 404, 409, 415, 422),
    )
    if retractable:
        web.route(
            bp,
            f"{one}/retract",
            "POST",
            retract,
            f"Retract a {title} record entered in error",
            endpoint=f"retract_{kind}",
            success_schema=record,
            body=schemas.RetractionSchema,
            body_required=False,
            errors=(400, 404, 409, 415),
        )


for _kind in schemas.KINDS:
    _register(_kind, retractable=_kind != "partner")


def revoke_consent(record_id: str) -> Response:
    record_id = _record_id("consent", record_id)
    return json_response(service.revoke_consent(record_id, schemas.load_revocation(web.json_body())))


web.route(
    bp,
    "/consents/<record_id>/revoke",
    "POST",
    revoke_consent,
    "Revoke a consent (the patient withdraws it; not an entry made in error): its Consent becomes inactive and "
    "deliveries waiting under it are blocked",
    endpoint="revoke_consent",
    success_schema=web.record_schema(schemas.SCHEMAS["consent"]),
    body=schemas.RevocationSchema,
    errors=(400, 404, 409, 415),
)


def put_organization() -> Response:
    body = web.json_body()
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in READ_ONLY}
    record, status = service.put_singleton("organization", schemas.load("organization", body))
    return json_response(record, status)


def get_organization() -> Response:
    return json_response(service.get_singleton("organization"))


# The program's own Organization: one record per service, at one URL (schemas.SINGLETONS).
_organization = web.record_schema(schemas.SCHEMAS["organization"])
web.route(
    bp,
    "/organization",
    "PUT",
    put_organization,
    "Record or replace the program's organization (its Organization is named as serviceProvider, requester, "
    "consent organization and managing organization by the records written after it)",
    endpoint="update_organization",
    body=schemas.SCHEMAS["organization"],
    success=201,
    success_description="the organization, recorded for the first time",
    success_schema=_organization,
    also={200: "the organization replaced, or already recorded with the same content (nothing changed)"},
    errors={
        400: "OperationOutcome",
        409: "OperationOutcome: the service already has an organization with another id",
        415: "OperationOutcome",
        422: "OperationOutcome",
    },
)
web.route(
    bp,
    "/organization",
    "GET",
    get_organization,
    "Read the program's organization",
    endpoint="get_organization",
    success_schema=_organization,
    errors={404: "OperationOutcome: no organization is recorded yet"},
)


def _disclosures(record_id: str) -> Response:
    web.check_parameters(("offset", "count"))
    offset, count = web.paging()
    store, writer = current_app.extensions["iop_fhir.store"], current_app.extensions["iop_fhir.audit"]
    enrollment = _record_id("enrollment", record_id)
    return json_response(accounting.accounting(store, store, writer, enrollment, offset=offset, count=count))


web.route(
    bp,
    "/enrollments/<record_id>/disclosures",
    "GET",
    _disclosures,
    "The accounting of disclosures of the enrollment's patient (administrators; needs AuditEvent.rs)",
    endpoint="disclosures",
    success_description="`{enrollment, patient, total, items}`, newest first; each item: date, recipient, purpose, "
    "action, outcome, resources, audit_event",
    errors=(400, 403, 404),
    parameters=_LIST_QUERY_DOC[1:],
)


def _summary_response(body: str | bytes, mimetype: str, record_id: str, extension: str) -> Response:
    # The filename names the discharge by its id only: a name or birth date would leak into download folders.
    headers = {"Content-Disposition": f'inline; filename="discharge-{record_id}-summary.{extension}"'}
    if extension == "html":
        headers["Content-Security-Policy"] = summary.CONTENT_SECURITY_POLICY
    return Response(body, mimetype=mimetype, headers=headers)


def get_discharge_summary_html(record_id: str) -> Response:
    record_id = _record_id("discharge", record_id)
    return _summary_response(summaries.html(record_id), "text/html", record_id, "html")


def get_discharge_summary_pdf(record_id: str) -> Response:
    record_id = _record_id("discharge", record_id)
    return _summary_response(summaries.pdf(record_id), "application/pdf", record_id, "pdf")


# The discharge's transition-of-care document, readable without FHIR: the same access as reading the discharge.
for _extension, _mimetype, _view in (
    ("html", "text/html", get_discharge_summary_html),
    ("pdf", "application/pdf", get_discharge_summary_pdf),
):
    web.route(
        bp,
        f"/discharges/<record_id>/summary.{_extension}",
        "GET",
        _view,
        f"The discharge summary as {_extension.upper()}: the transition-of-care document of the discharge (patient, "
        "stay, every section's narrative, the next appointment and aftercare referral, the 42 CFR Part 2 notice)",
        endpoint=_view.__name__,
        success_description=f"the summary ({_mimetype}, inline, never cached)",
        success_schema={"type": "string", "format": "binary"} if _extension == "pdf" else {"type": "string"},
        success_content_type=_mimetype,
        errors=(403, 404),
    )


# -- outcomes ---------------------------------------------------------------------------------------------------------

# The outcome pages hold inline SVG charts and their own styles, nothing else: no script, no request elsewhere.
OUTCOMES_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'"
)
_PROGRAM_QUERY_DOC = [
    {
        "name": "program",
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": "a program code (vocabulary program: adult-sud, adolescent-sud, adult-co-occurring); every "
        "program when absent",
    },
    {
        "name": "from",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "format": "date"},
        "description": "first day of the period (default: 12 weeks before `to`)",
    },
    {
        "name": "to",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "format": "date"},
        "description": "last day of the period (default: today)",
    },
]


def _page(body: str, name: str) -> Response:
    headers = {"Content-Disposition": f'inline; filename="{name}.html"', "Content-Security-Policy": OUTCOMES_CSP}
    return Response(body, mimetype="text/html", headers=headers)


def get_enrollment_outcomes(record_id: str) -> Response:
    web.check_parameters(())
    return json_response(outcomes.enrollment(_record_id("enrollment", record_id)))


def get_enrollment_outcomes_html(record_id: str) -> Response:
    web.check_parameters(())
    found = outcomes.enrollment(_record_id("enrollment", record_id))
    return _page(page.patient_page(found), f"outcomes-{record_id}")


def get_program_outcomes() -> Response:
    query = outcomes.program_query()
    report, _ = outcomes.program_outcomes(query, each=False)
    if request.accept_mimetypes.best_match([web.JSON, "text/csv"], default=web.JSON) == "text/csv":
        name = f"outcomes-{query.program or 'all'}-{query.period.start}-{query.period.end}.csv"
        headers = {"Content-Disposition": f'attachment; filename="{name}"'}
        return Response(outcomes.csv_text(report), mimetype="text/csv", headers=headers)
    return json_response(report)


def get_program_outcomes_html() -> Response:
    query = outcomes.program_query()
    report, stays = outcomes.program_outcomes(query)

    def href(enrollment_id: str) -> str:
        return url_for("iop.get_enrollment_outcomes_html", record_id=enrollment_id)

    return _page(page.program_page(report, stays, patient_href=href), f"outcomes-{query.program or 'all'}")


web.route(
    bp,
    "/enrollments/<record_id>/outcomes",
    "GET",
    get_enrollment_outcomes,
    "The outcomes of one stay: sessions scheduled and attended (by service; late and left early count as attended, "
    "the rest are missed by reason), treatment hours per calendar week against the plan and the ASAM 2.1 minimum, "
    "drug screens by week, PHQ-9 / GAD-7 / AUDIT-C first to latest with response and remission, craving trend, "
    "goals, length of stay, discharge reason and aftercare linkage (mappings/outcomes/rules.yaml defines each)",
    endpoint="get_enrollment_outcomes",
    success_description="the stay's outcomes (JSON)",
    errors=(400, 403, 404),
)
web.route(
    bp,
    "/enrollments/<record_id>/outcomes.html",
    "GET",
    get_enrollment_outcomes_html,
    "The outcomes of one stay as an HTML page with charts (for program staff)",
    endpoint="get_enrollment_outcomes_html",
    success_description="the page (text/html)",
    success_schema={"type": "string"},
    success_content_type="text/html",
    errors=(400, 403, 404),
)
web.route(
    bp,
    "/outcomes",
    "GET",
    get_program_outcomes,
    "A program's outcomes over a period: census, admissions and discharges by week, retention at 30/60/90 days, "
    "completion, median length of stay, attendance, the share of patient-weeks meeting the ASAM minimum, "
    "negative drug screens by week, PHQ-9 response and remission, aftercare linkage. Each rate has its numerator "
    "and denominator. `Accept: text/csv` answers one long-form table (metric, week, numerator, denominator, value)",
    endpoint="get_program_outcomes",
    success_description="the program's outcomes (JSON, or CSV with Accept: text/csv)",
    errors=(400, 403),
    parameters=_PROGRAM_QUERY_DOC,
)
web.route(
    bp,
    "/outcomes.html",
    "GET",
    get_program_outcomes_html,
    "A program's outcomes over a period as an HTML page with charts (census and attendance by week, ASAM hours, "
    "negative screens, PHQ-9 trajectories), each stay linked to its own page",
    endpoint="get_program_outcomes_html",
    success_description="the page (text/html)",
    success_schema={"type": "string"},
    success_content_type="text/html",
    errors=(400, 403),
    parameters=_PROGRAM_QUERY_DOC,
)
