"""create_app(config=None): wiring only: settings, store, repository, blueprints, error handlers."""

from __future__ import annotations

import logging
import traceback
from dataclasses import replace
from typing import Any

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from iop_fhir.config import Settings
from iop_fhir.errors import FhirError, Issue, operation_outcome
from iop_fhir.fhir import http
from iop_fhir.fhir.repository import Repository
from iop_fhir.store import migrate
from iop_fhir.store.sql import SqlStore

log = logging.getLogger("iop_fhir")

_HTTP_CODES = {
    400: "invalid",
    404: "not-found",
    405: "not-supported",
    413: "too-costly",
    415: "not-supported",
}


def create_app(config: Settings | dict[str, Any] | None = None) -> Flask:
    if isinstance(config, Settings):
        settings = config
    else:
        settings = Settings.from_env()
        if config:
            settings = replace(settings, **config)

    app = Flask(__name__)
    app.config["IOP_FHIR"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]

    store = SqlStore(settings.database_url, echo=settings.sql_echo)
    if migrate.is_empty(store.engine):
        migrate.upgrade(store.engine)
    app.extensions["iop_fhir.store"] = store
    app.extensions["iop_fhir.repository"] = Repository(
        store, default_count=settings.default_page_size, max_count=settings.max_page_size
    )

    from iop_fhir.fhir.views import bp as fhir_bp

    app.register_blueprint(fhir_bp)
    app.add_url_rule("/health", "health", lambda: {"status": "ok"})
    _register_error_handlers(app)
    return app


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(FhirError)
    def _fhir_error(error: FhirError) -> Response:
        return http.fhir_response(error.outcome, error.status, error.headers)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        if status == 413:
            limit = app.config["IOP_FHIR"].max_body_bytes
            message = f"the request body is larger than the limit of {limit} bytes"
        else:
            message = error.description or error.name
        issue = Issue(_HTTP_CODES.get(status, "processing"), message)
        response = http.fhir_response(operation_outcome([issue]), status)
        if status == 405 and error.get_response().headers.get("Allow"):
            response.headers["Allow"] = error.get_response().headers["Allow"]
        return response

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        # The message of an arbitrary exception may quote request data (PHI); log the type and frames only.
        log.error("unhandled %s\n%s", type(error).__name__, "".join(traceback.format_tb(error.__traceback__)))
        issue = Issue("exception", "internal server error; the request was not applied")
        return http.fhir_response(operation_outcome([issue]), 500)
