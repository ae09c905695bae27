"""A partner's client without the patient's consent tries every way in and sees nothing; forged tokens get 401;
scopes hold on every interaction; every request leaves an AuditEvent, and a partner's reads are accounted for.

42 CFR Part 2 (TERMINOLOGY.md §6), SMART Backend Services and v2 scopes, RFC 6750. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from iop_fhir.security.tokens import TokenIssuer
from iop_fhir.store import schema
from tests.auth import admin_token, mint
from tests.conftest import TOOLS
from tests.privacy.scenario import FHIR, PARTNER, as_client, contract, issue


def ids(bundle: dict[str, Any]) -> set[str]:
    return {
        f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle.get("entry", []) if "resource" in e
    }


def patients_in(bundle: dict[str, Any]) -> set[str]:
    text = orjson.dumps(bundle).decode()
    return {p for p in ("A", "B") if p in text}


# -- authentication -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/fhir/Patient", "/fhir/Patient/x", "/fhir/_history", "/iop/enrollments", "/fhir"])
def test_a_request_without_token_gets_401_with_a_bearer_challenge(anonymous: FlaskClient, path: str) -> None:
    response = anonymous.get(path)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="iop-fhir"')
    assert issue(response)["code"] == "login"
    assert issue(response)["expression"] == ["Authorization"]


@pytest.mark.parametrize("path", ["/fhir/metadata", "/fhir/.well-known/smart-configuration", "/health", "/auth/jwks"])
def test_discovery_and_health_need_no_token(anonymous: FlaskClient, path: str) -> None:
    assert anonymous.get(path).status_code == 200


def _signing_pem(app: Flask) -> str:
    with app.extensions["iop_fhir.store"].engine.connect() as conn:
        pem: str = conn.execute(select(schema.metadata.tables["auth_keys"].c.private_pem)).scalars().first()
    return pem


def _claims(app: Flask, **changes: Any) -> dict[str, Any]:
    keys = app.extensions["iop_fhir.keys"]
    now = int(time.time())
    claims = {
        "iss": keys.issuer.issuer,
        "aud": keys.issuer.audience,
        "sub": "test-program",
        "client_id": "test-program",
        "scope": "system/*.cruds",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": "j1",
    }
    claims.update(changes)
    return claims


def _forged(app: Flask, kind: str) -> str:
    keys = app.extensions["iop_fhir.keys"]
    kid, headers = keys.issuer.key_id, {"kid": keys.issuer.key_id, "typ": "at+jwt"}
    if kind == "alg-none":
        return jwt.encode(_claims(app), None, algorithm="none", headers=headers)
    if kind == "hs-rs-confusion":
        public_pem = keys.issuer.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        segments = [
            jwt.utils.base64url_encode(orjson.dumps({"alg": "HS384", "kid": kid, "typ": "at+jwt"})),
            jwt.utils.base64url_encode(orjson.dumps(_claims(app))),
        ]
        signing_input = b".".join(segments)
        signature = hmac.new(public_pem, signing_input, hashlib.sha384).digest()
        return (signing_input + b"." + jwt.utils.base64url_encode(signature)).decode()
    if kind == "wrong-key":
        other = ec.generate_private_key(ec.SECP384R1())
        return jwt.encode(_claims(app), other, algorithm="ES384", headers=headers)
    if kind == "expired":
        issuer = TokenIssuer(_signing_pem(app), kid, keys.issuer.issuer, keys.issuer.audience, 60, clock=lambda: 1e9)
        return issuer.issue("test-program", "system/*.cruds")
    if kind == "wrong-audience":
        issuer = TokenIssuer(_signing_pem(app), kid, keys.issuer.issuer, "https://elsewhere.example/fhir", 300)
        return issuer.issue("test-program", "system/*.cruds")
    if kind == "wrong-issuer":
        issuer = TokenIssuer(_signing_pem(app), kid, "https://evil.example", keys.issuer.audience, 300)
        return issuer.issue("test-program", "system/*.cruds")
    if kind == "tampered-scope":
        token = mint(app, "system/Observation.rs")
        head, payload, signature = token.split(".")
        claims = orjson.loads(jwt.utils.base64url_decode(payload))
        claims["scope"] = "system/*.cruds"
        return ".".join([head, jwt.utils.base64url_encode(orjson.dumps(claims)).decode(), signature])
    if kind == "garbage":
        return "not-a-jwt"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "alg-none",
        "hs-rs-confusion",
        "wrong-key",
        "expired",
        "wrong-audience",
        "wrong-issuer",
        "tampered-scope",
        "garbage",
    ],
)
def test_forged_expired_and_tampered_tokens_get_401_invalid_token(app: Flask, kind: str) -> None:
    response = as_client(app, _forged(app, kind)).get("/fhir/Patient")
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert issue(response)["code"] == "login"


def test_a_token_of_another_scheme_is_refused(app: Flask) -> None:
    response = app.test_client().get("/fhir/Patient", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


# -- scopes ---------------------------------------------------------------------------------------------------


@pytest.fixture
def observation_reader(app: Flask) -> FlaskClient:
    return as_client(app, mint(app, "system/Observation.rs"))


def test_observation_scope_cannot_read_or_search_careplans(observation_reader: FlaskClient) -> None:
    for path in ("/fhir/CarePlan", "/fhir/CarePlan/some-id", "/fhir/CarePlan/_history"):
        response = observation_reader.get(path)
        assert response.status_code == 403, path
        assert issue(response)["code"] == "forbidden"
        assert "system/CarePlan" in issue(response)["diagnostics"]
    assert observation_reader.get("/fhir/Observation").status_code == 200


def test_observation_scope_cannot_write_even_observations(observation_reader: FlaskClient, client: FlaskClient) -> None:
    body = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
    response = observation_reader.post("/fhir/Observation", data=orjson.dumps(body), content_type=FHIR)
    assert response.status_code == 403
    assert "system/Observation.c" in issue(response)["diagnostics"]
    total = client.get("/fhir/Observation?_summary=count").get_json()["total"]
    assert total == 0


def test_observation_scope_cannot_include_careplans_or_patients(observation_reader: FlaskClient) -> None:
    for query in ("_include=Observation:subject:Patient", "_revinclude=Provenance:target"):
        response = observation_reader.get(f"/fhir/Observation?{query}")
        assert response.status_code == 403, query
        assert issue(response)["code"] == "forbidden"


def test_each_entry_of_a_transaction_is_checked_and_a_refused_one_fails_it(
    observation_reader: FlaskClient, client: FlaskClient
) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:6f1b0c6e-7f2c-4a8e-9d55-1d2b3c4d5e6f",
                "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}},
                "request": {"method": "POST", "url": "Observation"},
            },
            {"request": {"method": "GET", "url": "CarePlan?status=active"}},
        ],
    }
    response = observation_reader.post("/fhir", data=orjson.dumps(bundle), content_type=FHIR)
    assert response.status_code == 403
    assert issue(response)["expression"] == ["Bundle.entry[0].request"]
    assert client.get("/fhir/Observation?_summary=count").get_json()["total"] == 0


def test_each_entry_of_a_batch_is_checked_on_its_own(observation_reader: FlaskClient) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": "CarePlan"}},
            {"request": {"method": "GET", "url": "Observation"}},
        ],
    }
    response = observation_reader.post("/fhir", data=orjson.dumps(bundle), content_type=FHIR)
    assert response.status_code == 200
    first, second = response.get_json()["entry"]
    assert first["response"]["status"].startswith("403")
    assert first["response"]["outcome"]["issue"][0]["code"] == "forbidden"
    assert second["response"]["status"].startswith("200")


def test_system_history_leaves_out_types_the_token_cannot_search(
    observation_reader: FlaskClient, client: FlaskClient
) -> None:
    body = {"resourceType": "Patient", "name": [{"family": "Hidden"}]}
    assert client.post("/fhir/Patient", data=orjson.dumps(body), content_type=FHIR).status_code == 201
    history = observation_reader.get("/fhir/_history").get_json()
    assert history["total"] == 0


def test_system_history_of_a_token_for_all_but_one_type_leaves_that_type_out(app: Flask, client: FlaskClient) -> None:
    from iop_fhir.r4 import definitions

    scope = " ".join(f"system/{t}.rs" for t in sorted(definitions.resource_types()) if t != "Patient")
    reader = as_client(app, mint(app, scope))
    patient = {"resourceType": "Patient", "name": [{"family": "Hidden"}]}
    assert client.post("/fhir/Patient", data=orjson.dumps(patient), content_type=FHIR).status_code == 201
    group = {"resourceType": "Group", "type": "person", "actual": False}
    assert client.post("/fhir/Group", data=orjson.dumps(group), content_type=FHIR).status_code == 201
    history = reader.get("/fhir/_history?_count=50").get_json()
    assert [e["request"]["url"] for e in history["entry"]] == ["Group"]
    assert history["total"] == 1


def test_iop_routes_need_the_scope_of_the_resources_they_produce(observation_reader: FlaskClient) -> None:
    response = observation_reader.post("/iop/enrollments", json=contract("enrollment"))
    assert response.status_code == 403
    assert "EpisodeOfCare" in issue(response)["diagnostics"]
    assert observation_reader.get("/iop/treatment-plans").status_code == 403


# -- Part 2: a partner without consent sees nothing -------------------------------------------------------------


def test_partner_reads_the_consented_patient_and_gets_404_for_the_other(program: dict[str, Any]) -> None:
    partner = program["partner"]
    assert partner.get(f"/fhir/{program['a']['patient']}").status_code == 200
    hidden = partner.get(f"/fhir/{program['b']['patient']}")
    assert hidden.status_code == 404
    unknown = partner.get("/fhir/Patient/does-not-exist")
    assert issue(hidden)["code"] == issue(unknown)["code"] == "not-found"
    assert partner.get(f"/fhir/{program['b']['patient']}/_history/1").status_code == 404
    assert partner.get(f"/fhir/{program['b']['patient']}/_history").status_code == 404
    assert partner.get(f"/fhir/{program['b']['episode']}").status_code == 404


def test_partner_search_totals_and_counts_never_reveal_the_other_patient(
    program: dict[str, Any], client: FlaskClient
) -> None:
    partner = program["partner"]
    everything = client.get("/fhir/Patient?_summary=count").get_json()["total"]
    assert everything == 2
    assert partner.get("/fhir/Patient?_summary=count").get_json()["total"] == 1
    assert partner.get("/fhir/Patient?_total=accurate").get_json()["total"] == 1
    assert partner.get("/fhir/Patient?family=Zyxwvut&_total=accurate").get_json()["total"] == 0
    found = partner.get("/fhir/Encounter?_total=accurate").get_json()
    assert found["total"] == 1
    assert all(e["resource"]["subject"]["reference"].endswith(program["a"]["patient"]) for e in found["entry"])


def test_partner_includes_revincludes_and_chains_stay_within_the_consented_patient(program: dict[str, Any]) -> None:
    partner = program["partner"]
    b_patient = program["b"]["patient"]
    queries = [
        "Encounter?_include=Encounter:subject",
        "Patient?_revinclude=Encounter:subject&_revinclude=Observation:subject",
        "Patient?_revinclude:iterate=Provenance:target&_revinclude=EpisodeOfCare:patient",
        "Encounter?subject:Patient.family=Zyxwvut",
        "Observation?patient.identifier=MRN-B-2",
        f"Encounter?subject={b_patient}",
        "Consent?_include=Consent:patient",
        "Provenance",
        "Practitioner",
    ]
    for query in queries:
        response = partner.get(f"/fhir/{query}")
        assert response.status_code == 200, (query, response.get_json())
        entries = orjson.dumps(response.get_json().get("entry", [])).decode()
        assert b_patient not in entries, query
        assert "Zyxwvut" not in entries, query


def test_partner_history_leaves_out_the_other_patient(program: dict[str, Any]) -> None:
    partner = program["partner"]
    b_patient = program["b"]["patient"]
    for path in ("/fhir/_history?_count=1000", "/fhir/Patient/_history", "/fhir/Encounter/_history"):
        bundle = partner.get(path).get_json()
        assert b_patient not in orjson.dumps(bundle).decode(), path
        assert "Zyxwvut" not in orjson.dumps(bundle).decode(), path
    assert partner.get("/fhir/Patient/_history").get_json()["total"] >= 1


def test_partner_transaction_and_batch_reads_of_the_other_patient_are_not_found(program: dict[str, Any]) -> None:
    partner = program["partner"]
    b_patient = program["b"]["patient"]
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": b_patient}},
            {"request": {"method": "GET", "url": "Patient?_total=accurate"}},
        ],
    }
    response = partner.post("/fhir", data=orjson.dumps(batch), content_type=FHIR)
    first, second = response.get_json()["entry"]
    assert first["response"]["status"].startswith("404")
    assert second["resource"]["total"] == 1
    transaction = {**batch, "type": "transaction", "entry": batch["entry"][:1]}
    response = partner.post("/fhir", data=orjson.dumps(transaction), content_type=FHIR)
    assert response.status_code == 404
    assert "Zyxwvut" not in response.get_data(as_text=True)


def test_partner_cannot_overwrite_or_delete_what_it_cannot_see(
    app: Flask, program: dict[str, Any], client: FlaskClient
) -> None:
    partner = as_client(app, mint(app, "system/*.cruds", partner=PARTNER))
    b_patient = program["b"]["patient"]
    before = client.get(f"/fhir/{b_patient}").get_json()
    changed = {**before, "gender": "unknown"}
    response = partner.put(f"/fhir/{b_patient}", data=orjson.dumps(changed), content_type=FHIR)
    assert response.status_code == 404
    assert partner.delete(f"/fhir/{b_patient}").status_code == 204
    after = client.get(f"/fhir/{b_patient}").get_json()
    assert after == before


def test_partner_clients_cannot_use_the_iop_api_audit_events_or_subscriptions(program: dict[str, Any]) -> None:
    partner = program["partner"]
    for path in ("/iop/enrollments", f"/iop/enrollments/{program['b']['enrollment']}", "/fhir/AuditEvent"):
        response = partner.get(path)
        assert response.status_code == 403, path
        assert issue(response)["code"] == "forbidden"
    assert partner.get("/fhir/Subscription").status_code == 403


def test_a_revoked_consent_stops_every_later_read(program: dict[str, Any]) -> None:
    partner = program["partner"]
    assert partner.get("/fhir/Patient?_summary=count").get_json()["total"] == 1
    # The lead program client revokes on the patient's behalf.
    revoker = program["partner"].application.test_client()
    response = revoker.post(f"/iop/consents/{program['consent']}/revoke", json={"revoked_on": "2026-06-01"})
    assert response.status_code == 200, response.get_json()
    assert partner.get("/fhir/Patient?_summary=count").get_json()["total"] == 0
    assert partner.get(f"/fhir/{program['a']['patient']}").status_code == 404


# -- audit ----------------------------------------------------------------------------------------------------


def audit_events(app: Flask, query: str = "") -> list[dict[str, Any]]:
    admin = as_client(app, admin_token(app))
    response = admin.get(f"/fhir/AuditEvent?_count=1000{query}")
    assert response.status_code == 200, response.get_json()
    return [e["resource"] for e in response.get_json().get("entry", [])]


def test_audit_events_are_for_administrators_only(app: Flask, client: FlaskClient) -> None:
    assert client.get("/fhir/AuditEvent").status_code == 403
    admin = as_client(app, admin_token(app))
    assert admin.get("/fhir/AuditEvent").status_code == 200
    event = {"resourceType": "AuditEvent", "type": {"code": "rest"}, "recorded": "2026-01-01T00:00:00Z"}
    refused = admin.post("/fhir/AuditEvent", data=orjson.dumps(event), content_type=FHIR)
    assert refused.status_code == 403


def test_a_write_is_audited_with_its_resource_and_patient(app: Flask, client: FlaskClient) -> None:
    body = {"resourceType": "Patient", "name": [{"family": "Audited"}]}
    created = client.post("/fhir/Patient", data=orjson.dumps(body), content_type=FHIR).get_json()
    [event] = [e for e in audit_events(app) if e.get("action") == "C"]
    assert event["outcome"] == "0"
    assert {"reference": f"Patient/{created['id']}"} in [e.get("what") for e in event["entity"]]
    assert event["agent"][0]["who"]["identifier"]["value"] == "test-program"
    assert event["subtype"][0]["code"] == "create"


def test_a_refused_request_is_audited_as_a_failure(app: Flask, observation_reader: FlaskClient) -> None:
    assert observation_reader.get("/fhir/CarePlan/x").status_code == 403
    failures = [e for e in audit_events(app) if e["outcome"] == "4"]
    assert failures and failures[0]["entity"][0]["what"] == {"reference": "CarePlan/x"}


def test_partner_reads_are_accounted_as_disclosures_of_that_patient_only(app: Flask, program: dict[str, Any]) -> None:
    partner = program["partner"]
    assert partner.get(f"/fhir/{program['a']['patient']}").status_code == 200
    assert partner.get("/fhir/Encounter").status_code == 200
    admin = as_client(app, admin_token(app))
    accounting = admin.get(f"/iop/enrollments/{program['a']['enrollment']}/disclosures").get_json()
    assert accounting["patient"] == program["a"]["patient"]
    actions = [item["action"] for item in accounting["items"]]
    assert "read" in actions and "search" in actions
    assert all(item["recipient"] == f"Organization/{PARTNER}" for item in accounting["items"])
    assert all(item["purpose"] == "TREAT" for item in accounting["items"])
    assert program["a"]["patient"] not in sum((i["resources"] for i in accounting["items"]), [])
    other = admin.get(f"/iop/enrollments/{program['b']['enrollment']}/disclosures").get_json()
    assert other["total"] == 0
    # The program's own client reads nothing of the accounting (administrators only).
    assert app.test_client().get(f"/iop/enrollments/{program['a']['enrollment']}/disclosures").status_code == 403


def test_logs_carry_no_patient_data(
    program: dict[str, Any], client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    partner = program["partner"]
    partner.get("/fhir/Patient?family=Zyxwvut")
    client.get("/fhir/Patient?family=Zyxwvut")
    as_client(partner.application, "forged.token.value").get("/fhir/Patient?family=Zyxwvut")
    assert "Zyxwvut" not in caplog.text
    assert "MRN-B-2" not in caplog.text


def _labelled(resource: dict[str, Any], *codes: str) -> dict[str, Any]:
    labels = [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": code} for code in codes]
    return {**resource, "meta": {"security": labels}}


def test_sud_counseling_notes_need_a_consent_of_their_own(
    app: Flask, program: dict[str, Any], client: FlaskClient
) -> None:
    note = _labelled(
        {
            "resourceType": "DocumentReference",
            "status": "current",
            "subject": {"reference": program["a"]["patient"]},
            "content": [{"attachment": {"contentType": "text/plain", "data": "bm90ZQ=="}}],
        },
        "42CFRPart2",
        "SUD",
        "PSYTHPN",
    )
    created = client.post("/fhir/DocumentReference", data=orjson.dumps(note), content_type=FHIR)
    assert created.status_code == 201
    partner = program["partner"]
    # The treatment consent keeps counseling notes out (its nested deny of PSYTHPN).
    assert partner.get("/fhir/DocumentReference?_summary=count").get_json()["total"] == 0
    assert partner.get(f"/fhir/DocumentReference/{created.get_json()['id']}").status_code == 404
    notes = contract("consent", program["a"]["enrollment"])
    notes.update(scope="sud-counseling-notes", signed_on="2026-02-01", expires_on="2099-01-01")
    assert client.post("/iop/consents", json=notes).status_code == 201
    assert partner.get("/fhir/DocumentReference?_summary=count").get_json()["total"] == 1
    assert partner.get(f"/fhir/DocumentReference/{created.get_json()['id']}").status_code == 200


def test_labelled_resources_of_no_patient_are_hidden_and_unlabelled_ones_shown(
    program: dict[str, Any], client: FlaskClient
) -> None:
    practitioner = _labelled({"resourceType": "Practitioner", "name": [{"family": "Counselor"}]}, "42CFRPart2")
    assert client.post("/fhir/Practitioner", data=orjson.dumps(practitioner), content_type=FHIR).status_code == 201
    codes = {"resourceType": "CodeSystem", "status": "active", "content": "complete", "url": "https://x.example/cs"}
    assert client.post("/fhir/CodeSystem", data=orjson.dumps(codes), content_type=FHIR).status_code == 201
    partner = program["partner"]
    assert client.get("/fhir/Practitioner?family=Counselor&_summary=count").get_json()["total"] == 1
    assert partner.get("/fhir/Practitioner?family=Counselor&_summary=count").get_json()["total"] == 0
    assert partner.get("/fhir/CodeSystem?url=https://x.example/cs&_summary=count").get_json()["total"] == 1


def test_a_consent_for_treatment_discloses_nothing_for_payment(app: Flask, program: dict[str, Any]) -> None:
    payer = as_client(app, mint(app, "system/*.rs", partner=PARTNER, purpose="HPAYMT"))
    assert payer.get("/fhir/Patient?_summary=count").get_json()["total"] == 0
    assert program["partner"].get("/fhir/Patient?_summary=count").get_json()["total"] == 1


def test_what_a_partner_receives_carries_the_labels_and_the_redisclosure_notice(
    program: dict[str, Any], client: FlaskClient, tmp_path: Path
) -> None:
    from iop_fhir.privacy.disclosure import REDISCLOSURE_NOTICE

    partner = program["partner"]
    bundle = partner.get("/fhir/Encounter").get_json()
    codes = [s["code"] for s in bundle["meta"]["security"]]
    assert {"R", "42CFRPart2", "SUD", "NORDSCLCD", "RedisclosureProhibitionMark"} <= set(codes)
    [mark] = [s for s in bundle["meta"]["security"] if s["code"] == "RedisclosureProhibitionMark"]
    assert mark["extension"][0]["valueString"] == REDISCLOSURE_NOTICE
    resource = partner.get(f"/fhir/{program['a']['patient']}").get_json()
    assert "RedisclosureProhibitionMark" in [s["code"] for s in resource["meta"]["security"]]
    assert list(resource)[:3] == ["resourceType", "id", "meta"]
    # The program's own client gets the records as stored.
    own = client.get(f"/fhir/{program['a']['patient']}").get_json()
    assert "RedisclosureProhibitionMark" not in [s["code"] for s in own["meta"]["security"]]
    (tmp_path / "bundle.json").write_bytes(orjson.dumps(bundle))
    (tmp_path / "patient.json").write_bytes(orjson.dumps(resource))
    checked = subprocess.run([str(TOOLS / "fhir-validate"), str(tmp_path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
