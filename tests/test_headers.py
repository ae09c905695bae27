"""Every response is hardened: security headers, records never cached, CORS only for configured origins."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from iop_fhir.app import create_app
from iop_fhir.config import Settings


@pytest.fixture
def cors_client(tmp_path: Path) -> Iterator[FlaskClient]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'cors.db'}",
        seed_conformance=False,
        cors_origins="https://app.example.org, https://other.example.org/",
    )
    app = create_app(settings)
    yield app.test_client()
    app.extensions["iop_fhir.store"].close()


@pytest.mark.parametrize("path", ["/fhir/Patient", "/iop/enrollments", "/fhir/Patient/missing", "/fhir/metadata"])
def test_every_response_carries_the_security_headers(sqlite_client: FlaskClient, path: str) -> None:
    response = sqlite_client.get(path)
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert response.headers["Referrer-Policy"] == "no-referrer"


def test_records_are_never_cached_but_the_capability_statement_may_be_revalidated(sqlite_client: FlaskClient) -> None:
    assert sqlite_client.get("/fhir/Patient").headers["Cache-Control"] == "no-store"
    assert sqlite_client.get("/iop/enrollments").headers["Cache-Control"] == "no-store"
    assert sqlite_client.get("/fhir/metadata").headers["Cache-Control"] == "no-cache"


def test_cors_is_off_unless_configured(sqlite_client: FlaskClient) -> None:
    response = sqlite_client.get("/fhir/Patient", headers={"Origin": "https://app.example.org"})
    assert "Access-Control-Allow-Origin" not in response.headers


def test_a_configured_origin_gets_cors_headers_and_preflight_answers(cors_client: FlaskClient) -> None:
    response = cors_client.get("/fhir/Patient", headers={"Origin": "https://other.example.org"})
    assert response.headers["Access-Control-Allow-Origin"] == "https://other.example.org"
    assert "ETag" in response.headers["Access-Control-Expose-Headers"]
    assert "Origin" in response.headers.getlist("Vary")
    preflight = cors_client.options(
        "/fhir/Patient",
        headers={"Origin": "https://app.example.org", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example.org"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]


def test_an_unlisted_origin_gets_no_cors_headers(cors_client: FlaskClient) -> None:
    response = cors_client.get("/fhir/Patient", headers={"Origin": "https://evil.example.net"})
    assert "Access-Control-Allow-Origin" not in response.headers
