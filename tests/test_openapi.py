"""openapi.yaml: the document the running app serves, valid OpenAPI 3.1, one operation per route; /docs serves
Swagger UI from the installed package with nothing fetched from elsewhere."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask
from flask.testing import FlaskClient
from openapi_spec_validator import validate

from iop_fhir.openapi import METHODS, document, render
from iop_fhir.r4 import definitions

ROOT = Path(__file__).resolve().parents[1]
# Routes that are not operations of the API: the Swagger UI page's own files, and a redirect to it; POST /fhir/ is
# POST /fhir (a trailing slash some FHIR clients send).
NOT_OPERATIONS = {("/docs", "GET"), ("/docs/init.js", "GET"), ("/docs/{}", "GET"), ("/fhir/", "POST")}


@pytest.fixture
def served(sqlite_app: Flask) -> dict[str, Any]:
    return document(sqlite_app)


def _operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (re.sub(r"\{[^}]+\}", "{}", path), method.upper())
        for path, operations in doc["paths"].items()
        for method in operations
        if method in METHODS
    }


def _routes(app: Flask) -> set[tuple[str, str]]:
    found = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:>]+:)?[^>]+>", "{}", rule.rule)
        found |= {(path, method) for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}}
    return found


def test_openapi_yaml_in_the_repository_is_the_document_the_app_serves(served: dict[str, Any]) -> None:
    assert (ROOT / "openapi.yaml").read_text() == render(served), "openapi.yaml is stale: python -m iop_fhir.openapi"


def test_the_document_is_valid_openapi_3_1(served: dict[str, Any]) -> None:
    assert served["openapi"] == "3.1.0"
    validate(yaml.safe_load(render(served)))


def test_every_route_of_the_app_is_documented_and_every_operation_is_routed(
    sqlite_app: Flask, served: dict[str, Any]
) -> None:
    routes = _routes(sqlite_app) - NOT_OPERATIONS
    operations = _operations(served)
    assert routes - operations == set(), "routes missing from the document"
    assert operations - routes == set(), "documented operations with no route"


def test_every_operation_has_an_id_a_summary_and_documented_success_and_errors(served: dict[str, Any]) -> None:
    ids = []
    for path, operations in served["paths"].items():
        for method, operation in operations.items():
            if method not in METHODS:
                continue
            ids.append(operation["operationId"])
            assert operation.get("summary"), (method, path)
            statuses = set(operation["responses"])
            assert any(s.startswith("2") for s in statuses), (method, path)
            assert "default" not in statuses, (method, path)
            if operation.get("security") != []:
                assert {"401", "403"} <= statuses, (method, path)
    assert len(ids) == len(set(ids))
    # usable as method names by client generators: letters and digits only
    assert [i for i in ids if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", i)] == []


def test_fhir_interactions_document_their_headers_and_fhir_error_bodies(served: dict[str, Any]) -> None:
    paths = served["paths"]
    create = paths["/fhir/{type}"]["post"]
    assert "If-None-Exist" in [p.get("name") for p in create["parameters"]]
    created = served["components"]["responses"]["CreatedResource"]
    assert {"ETag", "Location", "Last-Modified"} <= set(created["headers"])
    update = paths["/fhir/{type}/{id}"]["put"]
    assert {"$ref": "#/components/parameters/IfMatch"} in update["parameters"]
    assert {"$ref": "#/components/parameters/Prefer"} in update["parameters"]
    assert update["responses"]["412"] == {"$ref": "#/components/responses/FhirError"}
    error = served["components"]["responses"]["FhirError"]["content"]
    assert error == {"application/fhir+json": {"schema": {"$ref": "#/components/schemas/OperationOutcome"}}}


def test_the_resource_type_parameter_lists_every_type_the_server_supports(served: dict[str, Any]) -> None:
    assert served["components"]["parameters"]["type"]["schema"]["enum"] == sorted(definitions.resource_types())


def test_iop_records_document_their_fields_and_what_the_service_adds(served: dict[str, Any]) -> None:
    record = served["components"]["schemas"]["EnrollmentRecord"]
    assert {"id", "fhir", "meta"} <= set(record["required"])
    assert set(served["components"]["schemas"]["Enrollment"]["properties"]) <= set(record["properties"])
    created = served["paths"]["/iop/enrollments"]["post"]["responses"]
    assert created["201"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/EnrollmentRecord"}
    assert "200" in created  # the same record posted again


def test_openapi_yaml_is_served_without_a_token(anonymous: FlaskClient, sqlite_app: Flask) -> None:
    response = anonymous.get("/openapi.yaml")
    assert response.status_code == 200
    assert response.mimetype == "application/yaml"
    assert response.get_data(as_text=True) == render(document(sqlite_app))


def test_docs_serve_swagger_ui_from_the_installed_package_without_a_token(anonymous: FlaskClient) -> None:
    assert anonymous.get("/docs").status_code == 308
    page = anonymous.get("/docs/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "http://" not in html and "https://" not in html  # nothing from another origin
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    scripts = re.findall(r'<script src="([^"]+)"', html)
    assert scripts == ["swagger-ui-bundle.js", "swagger-ui-standalone-preset.js", "init.js"]
    for asset in [*scripts, "swagger-ui.css"]:
        with anonymous.get(f"/docs/{asset}") as served:
            assert served.status_code == 200, asset
            assert len(served.get_data()) > 10, asset
    assert "../openapi.yaml" in anonymous.get("/docs/init.js").get_data(as_text=True)
    assert anonymous.get("/docs/../../etc/passwd").status_code == 404
    assert anonymous.get("/docs/LICENSE").status_code == 404
