"""The token endpoint (SMART Backend Services), the service's JWKS and its SMART configuration, through the app.

Refusals run on SQLite; what depends on the database (replay, keys shared by processes) runs on both databases.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from flask import Flask
from flask.testing import FlaskClient

from iop_fhir.app import create_app
from iop_fhir.config import Settings
from iop_fhir.exchange.auth import SmartBackendAuth, TokenCache
from iop_fhir.security.registry import ClientRegistry, KeyRing
from iop_fhir.security.tokens import public_jwk
from iop_fhir.store.base import StoredRecord
from iop_fhir.store.sql import SqlStore

TOKEN_URL = "http://testserver/auth/token"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CLIENT = "ehr-north"
KID = "ehr-north-1"
PARTNER = "passaic-valley-recovery"


@pytest.fixture(scope="module")
def client_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture(scope="module")
def other_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def register(app: Flask, key: ec.EllipticCurvePrivateKey, client_id: str = CLIENT, **options: Any) -> None:
    registry: ClientRegistry = app.extensions["iop_fhir.clients"]
    jwks = {"keys": [{**public_jwk(key), "kid": KID, "alg": "ES384", "use": "sig"}]}
    registry.add(client_id, jwks=jwks, scope=options.pop("scope", "system/*.rs system/Task.cu"), **options)


def add_partner(store: SqlStore, partner_id: str) -> None:
    """A partner record as /iop/partners stores it (only its existence matters to a registration)."""
    now = int(time.time() * 1_000_000)
    with store.write() as tx:
        tx.save_record(StoredRecord("partner", partner_id, None, "active", 1, {"id": partner_id}, [], now, now))


def assertion(key: Any, algorithm: str = "ES384", headers: dict[str, Any] | None = None, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": CLIENT, "sub": CLIENT, "aud": TOKEN_URL, "iat": now, "exp": now + 240, "jti": uuid.uuid4().hex}
    payload.update(claims)
    return jwt.encode(
        {k: v for k, v in payload.items() if v is not None}, key, algorithm=algorithm, headers=headers or {"kid": KID}
    )


def form(signed: str, **changes: str | None) -> dict[str, str]:
    """A token request form with ``signed`` as the client assertion; a change to None leaves that parameter out."""
    body = {
        "grant_type": "client_credentials",
        "scope": "system/Observation.rs",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": signed,
    }
    body.update(changes)  # type: ignore[arg-type]
    return {k: v for k, v in body.items() if v is not None}


@pytest.fixture
def auth_app(sqlite_app: Flask, client_key: ec.EllipticCurvePrivateKey) -> Flask:
    register(sqlite_app, client_key)
    return sqlite_app


@pytest.fixture
def auth_client(auth_app: Flask) -> FlaskClient:
    return auth_app.test_client()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(**claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": CLIENT, "sub": CLIENT, "aud": TOKEN_URL, "exp": now + 240, "jti": uuid.uuid4().hex, **claims}
    header = b64(json.dumps({"alg": "none", "kid": KID}).encode())
    return f"{header}.{b64(json.dumps(payload).encode())}."


def hs256_with_public_key(key: ec.EllipticCurvePrivateKey) -> str:
    """The HS/RS confusion: an HMAC keyed with the client's public key, which anyone can read."""
    import hashlib
    import hmac

    now = int(time.time())
    payload = {"iss": CLIENT, "sub": CLIENT, "aud": TOKEN_URL, "exp": now + 240, "jti": uuid.uuid4().hex}
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'kid': KID}).encode())}.{b64(json.dumps(payload).encode())}"
    secret = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


# -- the happy path


def test_a_valid_assertion_gets_a_bearer_token_with_the_registration_claims(
    app: Flask, client: FlaskClient, client_key: ec.EllipticCurvePrivateKey
) -> None:
    add_partner(app.extensions["iop_fhir.store"], PARTNER)
    register(app, client_key, partner_id=PARTNER, admin=True)

    response = client.post(TOKEN_URL, data=form(assertion(client_key), scope="system/Observation.rs system/Task.u"))

    assert response.status_code == 200, response.json
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Pragma"] == "no-cache"
    body = response.json
    assert body is not None
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 300
    assert body["scope"] == "system/Observation.rs system/Task.u"
    keyring: KeyRing = app.extensions["iop_fhir.keys"]
    claims = keyring.verifier.verify(body["access_token"])
    assert claims.client_id == CLIENT
    assert str(claims.scopes) == "system/Observation.rs system/Task.u"
    assert claims.scopes.allows("Observation", "search") and not claims.scopes.allows("Observation", "create")
    assert (claims.partner, claims.purpose_of_use, claims.admin) == (PARTNER, "TREAT", True)


def test_the_issuer_and_audience_of_tokens_are_the_base_url(
    auth_client: FlaskClient, client_key: ec.EllipticCurvePrivateKey
) -> None:
    body = auth_client.post(TOKEN_URL, data=form(assertion(client_key))).json
    assert body is not None
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["iss"] == claims["aud"] == "http://testserver/fhir"
    assert "iop_admin" not in claims and "partner" not in claims


def test_the_exchange_client_of_the_service_gets_a_token_from_its_own_endpoint(
    auth_app: Flask, auth_client: FlaskClient, client_key: ec.EllipticCurvePrivateKey
) -> None:
    """iop-fhir's own SMART client (used towards partners) speaks the protocol this endpoint implements."""

    class FlaskSession(requests.Session):
        def post(self, url: str | bytes, data: Any = None, **_kwargs: Any) -> requests.Response:  # type: ignore[override]
            answer = auth_client.post(str(url), data=data)
            response = requests.Response()
            response.status_code = answer.status_code
            response._content = answer.data
            response.headers.update(dict(answer.headers))
            return response

    auth = SmartBackendAuth(
        "self",
        token_url=TOKEN_URL,
        client_id=CLIENT,
        private_key=client_key,
        key_id=KID,
        scope="system/Patient.rs",
        session=FlaskSession(),
        cache=TokenCache(),
    )

    token = auth.access_token()

    keyring: KeyRing = auth_app.extensions["iop_fhir.keys"]
    assert str(keyring.verifier.verify(token).scopes) == "system/Patient.rs"


# -- refusals of the client assertion: 401 invalid_client


Key = ec.EllipticCurvePrivateKey
# (how to build the assertion from the client's key and another key, the rule that refuses it)
REFUSED: dict[str, tuple[Callable[[Key, Key], str], str]] = {
    "alg-none": (lambda key, other: unsigned(), "alg-none"),
    "hs256-keyed-with-the-public-key": (lambda key, other: hs256_with_public_key(key), "alg-not-allowed"),
    "signed-by-another-key": (lambda key, other: assertion(other), "bad-signature"),
    "expired": (lambda key, other: assertion(key, exp=int(time.time()) - 120, iat=int(time.time()) - 360), "expired"),
    "exp-more-than-5-minutes-ahead": (
        lambda key, other: assertion(key, exp=int(time.time()) + 600),
        "lifetime-too-long",
    ),
    "aud-is-not-the-token-url": (lambda key, other: assertion(key, aud="http://testserver/fhir"), "wrong-audience"),
    "sub-is-not-iss": (lambda key, other: assertion(key, sub="someone-else"), "wrong-subject"),
    "no-jti": (lambda key, other: assertion(key, jti=None), "missing-claim"),
    "no-exp": (lambda key, other: assertion(key, exp=None), "missing-claim"),
    "unknown-kid": (lambda key, other: assertion(key, headers={"kid": "unknown"}), "unknown-kid"),
    "not-a-jws": (lambda key, other: "not.a-jwt", "malformed"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_bad_client_assertion_is_invalid_client_naming_the_rule(
    auth_client: FlaskClient, client_key: Key, other_key: Key, case: str
) -> None:
    build, reason = REFUSED[case]
    bad_assertion = build(client_key, other_key)

    response = auth_client.post(TOKEN_URL, data=form(bad_assertion))

    assert response.status_code == 401, response.json
    assert response.json is not None
    assert response.json["error"] == "invalid_client"
    assert f"({reason})" in response.json["error_description"]
    assert bad_assertion not in response.json["error_description"]
    assert response.headers["Cache-Control"] == "no-store"


def test_a_replayed_assertion_is_invalid_client(
    app: Flask, client: FlaskClient, client_key: ec.EllipticCurvePrivateKey
) -> None:
    register(app, client_key)
    once = assertion(client_key)
    assert client.post(TOKEN_URL, data=form(once)).status_code == 200

    response = client.post(TOKEN_URL, data=form(once))

    assert response.status_code == 401
    assert response.json is not None
    assert response.json["error"] == "invalid_client"
    assert "(replayed)" in response.json["error_description"]


def test_an_assertion_is_replayed_even_at_another_app_on_the_database(
    settings: Settings, client_key: ec.EllipticCurvePrivateKey
) -> None:
    first, second = create_app(settings), create_app(settings)
    try:
        register(first, client_key)
        once = assertion(client_key)
        assert first.test_client().post(TOKEN_URL, data=form(once)).status_code == 200
        response = second.test_client().post(TOKEN_URL, data=form(once))
        assert response.status_code == 401
        assert response.json is not None and "(replayed)" in response.json["error_description"]
    finally:
        first.extensions["iop_fhir.store"].close()
        second.extensions["iop_fhir.store"].close()


def test_a_disabled_client_is_invalid_client(
    auth_app: Flask, auth_client: FlaskClient, client_key: ec.EllipticCurvePrivateKey
) -> None:
    auth_app.extensions["iop_fhir.clients"].disable(CLIENT)
    response = auth_client.post(TOKEN_URL, data=form(assertion(client_key)))
    assert response.status_code == 401
    assert response.json is not None and response.json["error"] == "invalid_client"


def test_an_unknown_client_is_invalid_client(auth_client: FlaskClient, client_key: ec.EllipticCurvePrivateKey) -> None:
    response = auth_client.post(TOKEN_URL, data=form(assertion(client_key, iss="nobody", sub="nobody")))
    assert response.status_code == 401
    assert response.json is not None and response.json["error"] == "invalid_client"


def test_a_client_id_parameter_other_than_the_assertion_issuer_is_invalid_client(
    auth_client: FlaskClient, client_key: ec.EllipticCurvePrivateKey
) -> None:
    response = auth_client.post(TOKEN_URL, data=form(assertion(client_key), client_id="someone-else"))
    assert response.status_code == 401
    assert response.json is not None and response.json["error"] == "invalid_client"


def test_another_client_assertion_type_is_invalid_client(
    auth_client: FlaskClient, client_key: ec.EllipticCurvePrivateKey
) -> None:
    response = auth_client.post(TOKEN_URL, data=form(assertion(client_key), client_assertion_type="urn:x:saml2"))
    assert response.status_code == 401
    assert response.json is not None and response.json["error"] == "invalid_client"


# -- refusals of the request: 400


def test_a_grant_type_other_than_client_credentials_is_unsupported_grant_type(
    auth_client: FlaskClient, client_key: ec.EllipticCurvePrivateKey
) -> None:
    response = auth_client.post(TOKEN_URL, data=form(assertion(client_key), grant_type="authorization_code"))
    assert response.status_code == 400
    assert response.json is not None and response.json["error"] == "unsupported_grant_type"


def test_a_scope_outside_the_registration_is_invalid_scope(
    auth_client: FlaskClient, client_key: ec.EllipticCurvePrivateKey
) -> None:
    response = auth_client.post(TOKEN_URL, data=form(assertion(client_key), scope="system/Patient.d"))
    assert response.status_code == 400
    assert response.json is not None and response.json["error"] == "invalid_scope"


def test_requested_scopes_are_narrowed_to_the_registration(
    auth_client: FlaskClient, client_key: ec.EllipticCurvePrivateKey
) -> None:
    response = auth_client.post(TOKEN_URL, data=form(assertion(client_key), scope="system/Patient.rs system/Task.d"))
    assert response.status_code == 200
    assert response.json is not None and response.json["scope"] == "system/Patient.rs"


@pytest.mark.parametrize("missing", ["grant_type", "scope", "client_assertion_type", "client_assertion"])
def test_a_missing_parameter_is_invalid_request(
    auth_client: FlaskClient, client_key: ec.EllipticCurvePrivateKey, missing: str
) -> None:
    response = auth_client.post(TOKEN_URL, data=form(assertion(client_key), **{missing: None}))
    assert response.status_code == 400
    assert response.json is not None
    assert response.json == {"error": "invalid_request", "error_description": f"parameter {missing} is missing"}


def test_a_repeated_parameter_is_invalid_request(
    auth_client: FlaskClient, client_key: ec.EllipticCurvePrivateKey
) -> None:
    body = form(assertion(client_key))
    pairs = [*body.items(), ("scope", "system/*.rs")]
    response = auth_client.post(
        TOKEN_URL, data="&".join(f"{k}={v}" for k, v in pairs), content_type="application/x-www-form-urlencoded"
    )
    assert response.status_code == 400
    assert response.json is not None and response.json["error"] == "invalid_request"
    assert "scope" in response.json["error_description"]


def test_a_json_body_is_invalid_request(auth_client: FlaskClient, client_key: ec.EllipticCurvePrivateKey) -> None:
    response = auth_client.post(TOKEN_URL, json=form(assertion(client_key)))
    assert response.status_code == 400
    assert response.json is not None and response.json["error"] == "invalid_request"


def test_an_assertion_in_the_query_string_is_invalid_request(
    auth_client: FlaskClient, client_key: ec.EllipticCurvePrivateKey
) -> None:
    signed = assertion(client_key)
    response = auth_client.post(f"{TOKEN_URL}?client_assertion={signed}", data=form(signed))
    assert response.status_code == 400
    assert response.json is not None and response.json["error"] == "invalid_request"


# -- keys and discovery


def test_a_token_from_one_app_verifies_in_another_on_the_same_database(
    settings: Settings, client_key: ec.EllipticCurvePrivateKey
) -> None:
    first, second = create_app(settings), create_app(settings)
    try:
        register(first, client_key)
        body = first.test_client().post(TOKEN_URL, data=form(assertion(client_key))).json
        assert body is not None
        assert second.extensions["iop_fhir.keys"].verifier.verify(body["access_token"]).client_id == CLIENT
        assert second.test_client().get("/auth/jwks").json == first.test_client().get("/auth/jwks").json
    finally:
        first.extensions["iop_fhir.store"].close()
        second.extensions["iop_fhir.store"].close()


def test_an_app_with_a_signing_key_file_signs_with_it(sqlite_url: str, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    (tmp_path / "signing.pem").write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    settings = Settings(database_url=sqlite_url, seed_conformance=False, signing_key_file=tmp_path / "signing.pem")
    app = create_app(replace(settings, token_lifetime=60))
    try:
        jwks = app.test_client().get("/auth/jwks").json
        assert jwks is not None
        assert jwks["keys"][0]["x"] == public_jwk(key)["x"]
        assert app.extensions["iop_fhir.keys"].issuer.lifetime_s == 60
    finally:
        app.extensions["iop_fhir.store"].close()


def test_the_jwks_holds_public_keys_only(sqlite_client: FlaskClient) -> None:
    response = sqlite_client.get("/auth/jwks")
    assert response.status_code == 200
    assert response.json is not None
    (key,) = response.json["keys"]
    assert (key["kty"], key["crv"], key["alg"], key["use"]) == ("EC", "P-384", "ES384", "sig")
    assert "d" not in key


@pytest.mark.parametrize("path", ["/fhir/.well-known/smart-configuration", "/.well-known/smart-configuration"])
def test_the_smart_configuration_advertises_backend_services_at_the_base_and_at_the_root(
    sqlite_client: FlaskClient, path: str
) -> None:
    response = sqlite_client.get(path)
    assert response.status_code == 200
    config = response.json
    assert config is not None
    assert config["token_endpoint"] == TOKEN_URL
    assert config["jwks_uri"] == "http://testserver/auth/jwks"
    assert config["grant_types_supported"] == ["client_credentials"]
    assert config["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert config["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
    assert {"system/*.cruds", "system/*.rs"} <= set(config["scopes_supported"])
    assert {"client-confidential-asymmetric", "permission-v2"} <= set(config["capabilities"])


def test_without_a_base_url_the_token_endpoint_is_the_requests(sqlite_url: str) -> None:
    app = create_app(Settings(database_url=sqlite_url, seed_conformance=False))
    try:
        config = app.test_client().get("/fhir/.well-known/smart-configuration", base_url="https://iop.local").json
        assert config is not None and config["token_endpoint"] == "https://iop.local/auth/token"
    finally:
        app.extensions["iop_fhir.store"].close()


def test_the_capability_statement_names_smart_and_the_token_endpoint(sqlite_client: FlaskClient) -> None:
    security = sqlite_client.get("/fhir/metadata").json["rest"][0]["security"]  # type: ignore[index]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    (oauth,) = security["extension"]
    assert oauth["extension"] == [{"url": "token", "valueUri": TOKEN_URL}]
