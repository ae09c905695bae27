"""/openapi.yaml (the document) and /docs (Swagger UI, served from the flask-swagger-ui package: no network)."""

from __future__ import annotations

from pathlib import Path

import flask_swagger_ui
from flask import Blueprint, Response, current_app, redirect, send_from_directory

from iop_fhir.openapi import document, render

bp = Blueprint("openapi", __name__)

SWAGGER_DIST = Path(flask_swagger_ui.__file__).parent / "dist"
# Swagger UI's own files only; its inline styles need 'unsafe-inline' for style-src, scripts do not.
DOCS_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'"
)
_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>iop-fhir API</title>
  <link rel="stylesheet" type="text/css" href="swagger-ui.css">
  <link rel="icon" type="image/png" href="favicon-32x32.png" sizes="32x32">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="swagger-ui-bundle.js"></script>
  <script src="swagger-ui-standalone-preset.js"></script>
  <script src="init.js"></script>
</body>
</html>
"""
_INIT = """window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "../openapi.yaml",
    dom_id: "#swagger-ui",
    deepLinking: true,
    persistAuthorization: false,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    layout: "StandaloneLayout"
  });
};
"""


def _text(body: str, mimetype: str) -> Response:
    response = Response(body, mimetype=mimetype)
    response.headers["Content-Security-Policy"] = DOCS_POLICY
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/openapi.yaml")
def openapi_yaml() -> Response:
    if "iop_fhir.openapi" not in current_app.extensions:
        current_app.extensions["iop_fhir.openapi"] = render(document(current_app))
    response = Response(current_app.extensions["iop_fhir.openapi"], mimetype="application/yaml")
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/docs")
def docs_redirect() -> Response:
    return redirect("/docs/", code=308)  # type: ignore[return-value]


@bp.get("/docs/")
def docs() -> Response:
    return _text(_PAGE, "text/html")


@bp.get("/docs/init.js")
def docs_init() -> Response:
    return _text(_INIT, "text/javascript")


@bp.get(
    "/docs/<any('swagger-ui.css','swagger-ui-bundle.js','swagger-ui-standalone-preset.js','favicon-32x32.png'):name>"
)
def docs_asset(name: str) -> Response:
    response = send_from_directory(SWAGGER_DIST, name, max_age=3600)
    response.headers["Content-Security-Policy"] = DOCS_POLICY
    return response
