"""create_app(config=None): wiring only: settings, store, repository, blueprints, error handlers."""

from __future__ import annotations

import logging
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from iop_fhir import conformance
from iop_fhir.config import Settings
from iop_fhir.errors import FhirError, Issue, operation_outcome
from iop_fhir.fhir import http
from iop_fhir.fhir.repository import Repository
from iop_fhir.security import guard, headers
from iop_fhir.store import migrate
from iop_fhir.store.base import Store
from iop_fhir.store.sql import SqlStore

log = logging.getLogger("iop_fhir")

_HTTP_CODES = {
    400: "invalid",
    404: "not-found",
    405: "not-supported",
    413: "too-costly",
    415: "not-supported",
}


def build_repository(settings: Settings, store: Store, *, seed: bool = False) -> Repository:
    """The repository every writer uses (the app, the worker, sync): profiles checked on writes, and the write hooks
    that must see every stored version wherever it was written (referral intake, subscriptions)."""
    from iop_fhir.exchange import referrals
    from iop_fhir.exchange.subscriptions import Subscriptions

    profiles, conformance_resources = conformance.load(settings.profiles_dir, settings.terminology_dir)
    repository = Repository(
        store, default_count=settings.default_page_size, max_count=settings.max_page_size, profiles=profiles
    )
    if seed:
        conformance.seed(repository, conformance_resources)
    repository.write_hooks.append(referrals.on_resource_stored)
    repository.write_hooks.append(Subscriptions(repository).on_write)
    return repository


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
    if not migrate.is_current(store.engine):
        migrate.upgrade(store.engine)
    app.extensions["iop_fhir.store"] = store
    from iop_fhir.security.views import install as install_auth_server

    install_auth_server(app, settings, store)
    repository = build_repository(settings, store, seed=settings.seed_conformance)
    app.extensions["iop_fhir.repository"] = repository

    from iop_fhir.exchange import transitions
    from iop_fhir.iop.service import RecordService
    from iop_fhir.mapping import load_engine

    app.extensions["iop_fhir.records"] = RecordService(
        load_engine(Path(settings.mappings_dir).resolve()),
        repository,
        hooks=[transitions.on_record_saved],
        extras=[transitions.summary],
    )

    from iop_fhir.fhir import export_views
    from iop_fhir.fhir.views import bp as fhir_bp
    from iop_fhir.iop.views import IopApi
    from iop_fhir.iop.views import bp as iop_bp

    app.register_blueprint(fhir_bp)
    export_views.install(app)
    app.config.setdefault("API_TITLE", "iop-fhir")
    app.config.setdefault("API_VERSION", "0.1.0")
    app.config.setdefault("OPENAPI_VERSION", "3.1.0")
    api = IopApi(app)
    api.register_blueprint(iop_bp)
    from iop_fhir.iop.deliveries import bp as deliveries_bp

    api.register_blueprint(deliveries_bp)
    from iop_fhir.iop.referrals import bp as referrals_bp

    api.register_blueprint(referrals_bp)
    app.extensions["iop_fhir.api"] = api
    from iop_fhir.openapi.views import bp as openapi_bp

    app.register_blueprint(openapi_bp)
    app.add_url_rule("/health", "health", lambda: {"status": "ok"})
    _register_error_handlers(app)
    guard.install(app)
    headers.install(app, settings.cors_origins)
    return app


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
