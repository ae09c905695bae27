"""The Bulk Data $export endpoints under /fhir (https://hl7.org/fhir/uv/bulkdata/export.html): kick-off at system,
Patient and Group level, the status URL (poll, or DELETE to cancel) and the NDJSON files. The rules are in export.py.
"""

from __future__ import annotations

import orjson
from flask import Blueprint, Flask, Response, current_app, request

from iop_fhir.errors import BadRequest, information
from iop_fhir.fhir import export, http, operation
from iop_fhir.fhir.views import base_url
from iop_fhir.r4.instants import http_date
from iop_fhir.security import guard

bp = Blueprint("export", __name__, url_prefix="/fhir")


def install(app: Flask, exporter: export.Exporter) -> None:
    """The endpoints, and the app's Exporter (its background thread runs the jobs this process accepts)."""
    app.extensions["iop_fhir.exports"] = exporter
    app.register_blueprint(bp)


def exporter() -> export.Exporter:
    found: export.Exporter = current_app.extensions["iop_fhir.exports"]
    return found


@bp.route("/$export", methods=["GET", "POST"])
def export_system() -> Response:
    return _kick_off("system")


@bp.route("/Patient/$export", methods=["GET", "POST"])
def export_patients() -> Response:
    return _kick_off("patient")


@bp.route("/Group/<group_id>/$export", methods=["GET", "POST"])
def export_group(group_id: str) -> Response:
    return _kick_off("group", group_id)


def _kick_off(level: str, group: str | None = None) -> Response:
    http.check_format(request)
    prefer = request.headers.get("Prefer")
    if not export.respond_async(prefer):
        raise BadRequest("$export answers asynchronously: send the header Prefer: respond-async", "Prefer")
    params = [(k, v) for k, v in request.args.items(multi=True)]
    references: frozenset[int] = frozenset()
    if request.method == "POST" and not _empty_body():
        body = http.json_body(request)
        references = frozenset(len(params) + i for i in export.reference_parameters(body))
        params += operation.parameters(body, "$export")
    asked = export.parse(level, params, lenient=http.lenient(prefer), group=group, references=references)
    url = base_url() + request.full_path.removeprefix("/fhir").removesuffix("?")
    job_id = export.kick_off(exporter(), guard.access(), guard.repository(), asked, url)
    status_url = f"{base_url()}/$export-status/{job_id}"
    outcome = information(f"export job {job_id} accepted; poll {status_url}")
    return http.fhir_response(outcome, 202, {"Content-Location": status_url})


def _empty_body() -> bool:
    """Whether a POST kick-off came without a body (as Medplum's bulkExport sends it): its parameters are then
    those of its query string, as of a GET; a body, whatever its framing, must be a Parameters resource."""
    if request.content_length is not None:
        return request.content_length == 0
    return "chunked" not in request.headers.get("Transfer-Encoding", "").lower()


@bp.get("/$export-status/<job_id>")
def export_status(job_id: str) -> Response:
    job = export.poll(exporter(), guard.access(), job_id)
    if job.status in ("queued", "running"):
        headers = {"X-Progress": export.progress(job, guard.access()), "Retry-After": str(export.RETRY_AFTER_S)}
        return http.fhir_response(None, 202, headers)  # no body: no Content-Type
    if job.status == "failed":
        raise export.failure(job)
    body = export.manifest(exporter(), job, base_url())
    headers = {"Expires": http_date(job.expires)} if job.expires is not None else {}
    return Response(orjson.dumps(body), status=200, headers=headers, mimetype="application/json")


@bp.delete("/$export-status/<job_id>")
def export_cancel(job_id: str) -> Response:
    export.cancel(exporter(), guard.principal(), job_id)
    return http.fhir_response(information(f"export job {job_id} and its files are deleted"), 202)


@bp.get("/$export-file/<job_id>/<int:file_no>")
def export_file(job_id: str, file_no: int) -> Response:
    chunks = export.file_chunks(exporter(), guard.access(), job_id, file_no)
    return Response(chunks, status=200, mimetype=export.NDJSON)
