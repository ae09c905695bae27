"""create_app(config=None): wiring only: the runtime (runtime.py builds every part), blueprints, error handlers,
the request guard and headers."""

from __future__ import annotations

import logging
import traceback
from dataclasses import replace
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from iop_fhir import limits
from iop_fhir import runtime as runtimes
from iop_fhir.config import Settings
from iop_fhir.errors import FhirError, Issue, operation_outcome
from iop_fhir.fhir import export_views, http
from iop_fhir.fhir.measures_views import bp as measures_bp
from iop_fhir.fhir.views import bp as fhir_bp
from iop_fhir.iop.deliveries import bp as deliveries_bp
from iop_fhir.iop.referrals import bp as referrals_bp
from iop_fhir.iop.views import IopApi
from iop_fhir.iop.views import bp as iop_bp
from iop_fhir.openapi.views import bp as openapi_bp
from iop_fhir.runtime import Runtime
from iop_fhir.security import guard, headers
from iop_fhir.security.views import install as install_auth_server

log = logging.getLogger("iop_fhir")

_HTTP_CODES = {
    400: "invalid",
    404: "not-found",
    405: "not-supported",
    413: "too-costly",
    415: "not-supported",
}


def create_app(config: Settings | dict[str, Any] | None = None, *, runtime: Runtime | None = None) -> Flask:
    """The WSGI app on ``runtime``, or on a runtime built from ``config`` (Settings, or overrides of the
    environment's settings)."""
    if runtime is None:
        if isinstance(config, Settings):
            settings = config
        else:
            settings = Settings.from_env()
            if config:
                settings = replace(settings, **config)
        runtime = runtimes.build(settings, seed=settings.seed_conformance)
    settings = runtime.settings

    app = Flask(__name__)
    app.config["IOP_FHIR"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    limits.install(app)  # first: an oversized request is refused before anything else reads it
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["iop_fhir.runtime"] = runtime
    app.extensions["iop_fhir.store"] = runtime.store
    app.extensions["iop_fhir.repository"] = runtime.repository
    app.extensions["iop_fhir.records"] = runtime.records
    app.extensions["iop_fhir.outcomes"] = runtime.outcomes
    app.extensions["iop_fhir.audit"] = runtime.audit

    install_auth_server(app, runtime.clients, runtime.keys)
    app.register_blueprint(fhir_bp)
    app.register_blueprint(measures_bp)
    export_views.install(app, runtime.exporter())
    app.config.setdefault("API_TITLE", "iop-fhir")
    app.config.setdefault("API_VERSION", "0.1.0")
    app.config.setdefault("OPENAPI_VERSION", "3.1.0")
    api = IopApi(app)
    api.register_blueprint(iop_bp)
    api.register_blueprint(deliveries_bp)
    api.register_blueprint(referrals_bp)
    app.extensions["iop_fhir.api"] = api
    app.register_blueprint(openapi_bp)
    app.add_url_rule("/health", "health", lambda: {"status": "ok"})
    _register_error_handlers(app)
    _track_request_base(app)
    guard.install(app)
    headers.install(app, settings.cors_origins)
    return app


def _track_request_base(app: Flask) -> None:
    """Tells the write hooks the public base of the request being served (runtime.REQUEST_BASE)."""

    @app.before_request
    def _enter() -> None:
        g.iop_request_base = runtimes.REQUEST_BASE.set(_request_fhir_base)

    @app.teardown_request
    def _leave(_error: BaseException | None) -> None:
        token = g.pop("iop_request_base", None)
        if token is not None:
            runtimes.REQUEST_BASE.reset(token)


def _request_fhir_base() -> str:
    return request.host_url.rstrip("/") + "/fhir"


def _outcome_response(outcome: dict[str, Any], status: int, headers: dict[str, str] | None = None) -> Response:
    """An OperationOutcome: application/fhir+json under /fhir, application/json under /iop (not a FHIR API)."""
    response = http.fhir_response(outcome, status, headers)
    if request.path == "/iop" or request.path.startswith("/iop/"):
        response.content_type = "application/json"
    return response


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(FhirError)
    def _fhir_error(error: FhirError) -> Response:
        return _outcome_response(error.outcome, error.status, error.headers)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        if status == 413:
            limit = app.config["IOP_FHIR"].max_body_bytes
            message = f"the request body is larger than the limit of {limit} bytes"
        else:
            message = error.description or error.name
        issue = Issue(_HTTP_CODES.get(status, "processing"), message)
        response = _outcome_response(operation_outcome([issue]), status)
        if status == 405 and error.get_response().headers.get("Allow"):
            response.headers["Allow"] = error.get_response().headers["Allow"]
        return response

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        # The message of an arbitrary exception may quote request data (PHI); log the type and frames only.
        log.error("unhandled %s\n%s", type(error).__name__, "".join(traceback.format_tb(error.__traceback__)))
        issue = Issue("exception", "internal server error; the request was not applied")
        return _outcome_response(operation_outcome([issue]), 500)
