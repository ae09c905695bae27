"""A partner's restriction is decided once per state of the Consents, not on every request: the next request after
any Consent write (through /iop, through /fhir, by another process on the same database) decides it again and sees
the change; one with no write in between reuses the decision."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from iop_fhir.app import create_app
from iop_fhir.config import Settings
from iop_fhir.privacy import disclosure
from tests.auth import mint
from tests.privacy.scenario import as_client, contract


@pytest.fixture
def decisions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The recipients each fresh decision was made for."""
    made: list[str] = []
    decide = disclosure._decide

    def counted(store: Any, recipient: str, purpose: str, on: Any) -> Any:
        made.append(recipient)
        return decide(store, recipient, purpose, on)

    monkeypatch.setattr(disclosure, "_decide", counted)
    return made


def subjects(partner: FlaskClient) -> set[str]:
    response = partner.get("/fhir/Observation?_count=100")
    assert response.status_code == 200, response.get_json()
    return {e["resource"]["subject"]["reference"] for e in response.get_json().get("entry", [])}


def test_requests_with_no_consent_written_between_them_reuse_the_decision(
    program: dict[str, Any], decisions: list[str]
) -> None:
    partner = program["partner"]
    for _ in range(3):
        assert subjects(partner) == {program["a"]["patient"]}
    assert len(decisions) == 1


def test_a_consent_given_or_revoked_counts_from_the_next_request(
    client: FlaskClient, program: dict[str, Any], decisions: list[str]
) -> None:
    partner = program["partner"]
    assert subjects(partner) == {program["a"]["patient"]}
    consent = contract("consent", program["b"]["enrollment"])
    consent["signed_on"], consent["expires_on"] = "2026-01-01", "2099-01-01"
    given = client.post("/iop/consents", json=consent)
    assert given.status_code == 201, given.get_json()
    assert subjects(partner) == {program["a"]["patient"], program["b"]["patient"]}
    revoked = client.post(f"/iop/consents/{program['consent']}/revoke", json={"revoked_on": "2026-02-01"})
    assert revoked.status_code == 200, revoked.get_json()
    assert subjects(partner) == {program["b"]["patient"]}
    assert len(decisions) == 3


def test_a_consent_deleted_through_fhir_by_another_process_counts_at_once(
    app: Flask, settings: Settings, program: dict[str, Any]
) -> None:
    partner = program["partner"]
    assert subjects(partner) == {program["a"]["patient"]}
    other = create_app(settings)  # a second process on the same database
    try:
        other.config["TESTING"] = True
        admin = as_client(other, mint(other, "system/*.cruds", consents=True))
        found = admin.get(f"/fhir/Consent?patient={program['a']['patient']}").get_json()
        for entry in found["entry"]:
            deleted = admin.delete(f"/fhir/Consent/{entry['resource']['id']}")
            assert deleted.status_code in (200, 204), deleted.get_json()
    finally:
        other.extensions["iop_fhir.store"].close()
    assert subjects(partner) == set()
