"""The partner scenario of the Part 2 tests: a partner, patient A who consented to disclosure to it, patient B who did
not; and the helpers that build it. Its fixtures reach every test through ``pytest_plugins`` in tests/conftest.py (a
conftest here would shadow the root conftest for bare imports)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.auth import TokenClient, mint

CONTRACT = Path(__file__).resolve().parents[2].parent / "shared" / "contract"
PARTNER = "passaic-valley-recovery"
FHIR = "application/fhir+json"


def contract(kind: str, enrollment_id: str | None = None) -> dict[str, Any]:
    text = (CONTRACT / f"{kind}.json").read_text(encoding="utf-8")
    payload: dict[str, Any] = json.loads(text.replace("{{enrollment_id}}", enrollment_id or ""))
    return payload


def issue(response: Any) -> dict[str, Any]:
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome", body
    first: dict[str, Any] = body["issue"][0]
    return first


def as_client(app: Flask, token: str) -> FlaskClient:
    found = app.test_client()
    assert isinstance(found, TokenClient)
    found.token = token
    return found


def enroll(client: FlaskClient, mrn: str, family: str) -> dict[str, str]:
    payload = contract("enrollment")
    payload["patient"]["identifiers"][0]["value"] = mrn
    payload["patient"]["name"]["family"] = family
    response = client.post("/iop/enrollments", json=payload)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    refs = {ref.split("/", 1)[0]: ref for ref in reversed(body["fhir"])}
    session = client.post("/iop/sessions", json=contract("session", body["id"]))
    assert session.status_code == 201, session.get_json()
    return {"enrollment": body["id"], "patient": refs["Patient"], "episode": refs["EpisodeOfCare"]}


@pytest.fixture
def program(app: Flask, client: FlaskClient) -> dict[str, Any]:
    """A partner, patient A who consented to disclosure to it, patient B who did not (nor to anyone)."""
    assert client.post("/iop/partners", json=contract("partner")).status_code == 201
    a = enroll(client, "MRN-A-1", "Consentida")
    b = enroll(client, "MRN-B-2", "Zyxwvut")
    consent = contract("consent", a["enrollment"])
    consent["signed_on"] = "2026-01-01"
    consent["expires_on"] = "2099-01-01"
    response = client.post("/iop/consents", json=consent)
    assert response.status_code == 201, response.get_json()
    partner = as_client(app, mint(app, "system/*.rs", partner=PARTNER))
    return {"a": a, "b": b, "partner": partner, "consent": response.get_json()["id"]}
