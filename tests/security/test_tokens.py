"""Access tokens of the service and SMART Backend Services client assertions (iop_fhir.security.tokens, no app).

Every rule that refuses a token has its own test; forged tokens are built by hand so that no library refuses to
make them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from iop_fhir.exchange.auth import SmartBackendAuth
from iop_fhir.security.scopes import ScopeError, Scopes
from iop_fhir.security.tokens import (
    ClientAssertion,
    TokenError,
    TokenIssuer,
    TokenVerifier,
    assertion_client_id,
    verify_client_assertion,
)

ISSUER = "https://iop.example.org/auth"
AUDIENCE = "https://iop.example.org/fhir"
TOKEN_URL = "https://iop.example.org/auth/token"
KID = "service-key-1"
CLIENT = "ehr-north"
CLIENT_KID = "ehr-north-key-1"
Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture(scope="module", params=["RS384", "ES384"])
def service_key(request: pytest.FixtureRequest, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> Key:
    return rsa_key if request.param == "RS384" else ec_key


def pem(key: Key) -> bytes:
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def public_pem(key: Key) -> bytes:
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def issuer_for(key: Key, *, kid: str = KID, **overrides: Any) -> TokenIssuer:
    settings: dict[str, Any] = {"issuer": ISSUER, "audience": AUDIENCE, "lifetime_s": 300, **overrides}
    return TokenIssuer(pem(key), kid, **settings)


@pytest.fixture
def verifier(rsa_key: rsa.RSAPrivateKey) -> TokenVerifier:
    return TokenVerifier({KID: public_pem(rsa_key)}, ISSUER, AUDIENCE, leeway_s=0)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], hmac_secret: bytes | None = None) -> str:
    """A compact JWS built by hand: unsigned, or HMAC-SHA256 with ``hmac_secret``."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(hmac_secret, signing_input.encode(), hashlib.sha256).digest() if hmac_secret else b""
    return f"{signing_input}.{b64(signature)}"


def access_claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "sub": CLIENT,
        "aud": AUDIENCE,
        "client_id": CLIENT,
        "scope": "system/CarePlan.rs",
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        **overrides,
    }
    return {name: value for name, value in claims.items() if value is not None}


def signed(key: Key, claims: dict[str, Any], *, kid: str | None = KID, typ: str = "at+jwt", alg: str = "") -> str:
    algorithm = alg or ("RS384" if isinstance(key, rsa.RSAPrivateKey) else "ES384")
    headers: dict[str, Any] = {"typ": typ}
    if kid is not None:
        headers["kid"] = kid
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)


def rejection(verifier: TokenVerifier, token: str) -> TokenError:
    with pytest.raises(TokenError) as raised:
        verifier.verify(token)
    return raised.value


# --- issuing and verifying -------------------------------------------------------------------------------------


def test_issued_token_verifies_with_its_client_scopes_partner_and_purpose(service_key: Key) -> None:
    issuer = issuer_for(service_key)
    verifier = TokenVerifier({KID: service_key.public_key()}, ISSUER, AUDIENCE, leeway_s=0)

    claims = verifier.verify(
        issuer.issue(CLIENT, "system/CarePlan.rs system/Observation.cruds", partner="ehr-north", purpose_of_use="TREAT")
    )

    assert claims.client_id == CLIENT
    assert claims.scopes == Scopes.parse("system/CarePlan.rs system/Observation.cruds")
    assert claims.scopes.allows("Observation", "create")
    assert not claims.scopes.allows("CarePlan", "update")
    assert (claims.partner, claims.purpose_of_use) == ("ehr-north", "TREAT")
    assert claims.expires_at - claims.issued_at == 300
    assert len(claims.jti) == 32


@pytest.mark.parametrize(("key_name", "algorithm"), [("rsa_key", "RS384"), ("ec_key", "ES384")])
def test_issuer_signs_rs384_with_an_rsa_key_and_es384_with_a_p384_key(
    key_name: str, algorithm: str, request: pytest.FixtureRequest
) -> None:
    token = issuer_for(request.getfixturevalue(key_name)).issue(CLIENT, ["system/Patient.rs"])

    assert jwt.get_unverified_header(token) == {"alg": algorithm, "kid": KID, "typ": "at+jwt"}


def test_token_without_partner_or_purpose_carries_none(verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    claims = verifier.verify(issuer_for(rsa_key).issue(CLIENT, "system/*.rs"))

    assert (claims.partner, claims.purpose_of_use) == (None, None)


def test_public_jwk_verifies_the_issuers_tokens(service_key: Key) -> None:
    issuer = issuer_for(service_key)
    jwk = issuer.public_jwk()

    claims = TokenVerifier({jwk["kid"]: jwk}, ISSUER, AUDIENCE).verify(issuer.issue(CLIENT, "system/Patient.r"))

    assert (jwk["alg"], jwk["use"]) == (issuer.algorithm, "sig")
    assert "d" not in jwk
    assert claims.client_id == CLIENT


def test_issuer_refuses_an_ec_key_off_p384() -> None:
    with pytest.raises(ValueError, match="P-384"):
        issuer_for(ec.generate_private_key(ec.SECP256R1()))


def test_issuer_refuses_an_rsa_key_shorter_than_2048_bits() -> None:
    with pytest.raises(ValueError, match="2048"):
        issuer_for(rsa.generate_private_key(public_exponent=65537, key_size=1024))


def test_issuer_refuses_text_that_is_not_a_private_key() -> None:
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        TokenIssuer("not a key", KID, ISSUER, AUDIENCE, 300)


def test_issuer_refuses_invalid_scopes(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ScopeError) as raised:
        issuer_for(rsa_key).issue(CLIENT, "system/CarePlan.rw")

    assert raised.value.scope == "system/CarePlan.rw"


def test_issuer_refuses_a_token_without_scopes(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError, match="at least one scope"):
        issuer_for(rsa_key).issue(CLIENT, "")


@pytest.mark.parametrize(
    "material",
    [
        b"a shared secret",
        "-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n",
        {"kty": "oct", "k": "c2VjcmV0"},
    ],
)
def test_verifier_refuses_a_key_that_is_not_rsa_or_p384(material: Any) -> None:
    with pytest.raises(ValueError, match="is not an RSA key"):
        TokenVerifier({KID: material}, ISSUER, AUDIENCE)


def test_verifier_refuses_a_short_rsa_key() -> None:
    short = rsa.generate_private_key(public_exponent=65537, key_size=1024)

    with pytest.raises(ValueError, match="is not an RSA key of 2048 bits or more"):
        TokenVerifier({KID: public_pem(short)}, ISSUER, AUDIENCE)


# --- every reason a token is refused ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not-a-token",
        "abc.def",
        "abc.def.ghi",
        "a.b.c.d.e",
        f"{b64(b'[1, 2]')}.{b64(b'{}')}.",
    ],
    ids=["empty", "one-part", "two-parts", "not-base64url-json", "five-parts-jwe", "header-not-an-object"],
)
def test_malformed_token_is_rejected(verifier: TokenVerifier, token: str) -> None:
    assert rejection(verifier, token).reason == "malformed"


def test_signed_token_whose_payload_is_not_json_is_rejected(
    verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    token = jwt.api_jws.encode(b"not json", rsa_key, algorithm="RS384", headers={"kid": KID, "typ": "at+jwt"})

    assert rejection(verifier, token).reason == "malformed"


def test_unsigned_payload_is_not_parsed_before_the_signature_is_checked(verifier: TokenVerifier) -> None:
    header = b64(json.dumps({"alg": "RS384", "kid": KID, "typ": "at+jwt"}).encode())

    assert rejection(verifier, f"{header}.not-json.{b64(b'sig')}").reason == "bad-signature"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_token_with_alg_none_is_rejected(verifier: TokenVerifier, alg: str) -> None:
    token = forge({"alg": alg, "kid": KID, "typ": "at+jwt"}, access_claims(scope="system/*.cruds"))

    assert rejection(verifier, token).reason == "alg-none"


@pytest.mark.parametrize("encoding", ["pem", "der"])
def test_hs256_token_signed_with_the_public_key_is_rejected(
    verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey, encoding: str
) -> None:
    public_key = rsa_key.public_key()
    secret = (
        public_pem(rsa_key)
        if encoding == "pem"
        else public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    token = forge({"alg": "HS256", "kid": KID, "typ": "at+jwt"}, access_claims(scope="system/*.cruds"), secret)

    error = rejection(verifier, token)

    assert error.reason == "alg-not-allowed"
    assert "HS256" in error.detail


@pytest.mark.parametrize(("alg", "key_kind"), [("RS256", "rsa"), ("PS384", "rsa"), ("RS512", "rsa"), ("ES256", "ec")])
def test_token_with_an_algorithm_other_than_rs384_or_es384_is_rejected(
    verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey, alg: str, key_kind: str
) -> None:
    key = rsa_key if key_kind == "rsa" else ec.generate_private_key(ec.SECP256R1())
    token = signed(key, access_claims(), alg=alg)

    assert rejection(verifier, token).reason == "alg-not-allowed"


def test_token_whose_alg_is_not_that_of_the_key_named_by_kid_is_rejected(
    verifier: TokenVerifier, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    token = signed(ec_key, access_claims(), kid=KID)  # ES384, but KID is the service's RSA key

    error = rejection(verifier, token)

    assert error.reason == "alg-not-allowed"
    assert "RS384" in error.detail


def test_token_with_an_unknown_kid_is_rejected(verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    token = issuer_for(rsa_key, kid="retired-key").issue(CLIENT, "system/*.rs")

    assert rejection(verifier, token).reason == "unknown-kid"


def test_token_without_kid_is_rejected(verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    token = signed(rsa_key, access_claims(), kid=None)

    assert rejection(verifier, token).reason == "unknown-kid"


def test_token_signed_by_another_key_under_the_services_kid_is_rejected(
    verifier: TokenVerifier, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    token = issuer_for(other_rsa_key).issue(CLIENT, "system/*.cruds")

    assert rejection(verifier, token).reason == "bad-signature"


def test_token_with_a_tampered_payload_is_rejected(verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    header, _, signature = issuer_for(rsa_key).issue(CLIENT, "system/Observation.rs").split(".")
    widened = b64(json.dumps(access_claims(scope="system/*.cruds")).encode())

    assert rejection(verifier, f"{header}.{widened}.{signature}").reason == "bad-signature"


def test_expired_token_is_rejected(verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    token = issuer_for(rsa_key, clock=lambda: time.time() - 3600).issue(CLIENT, "system/*.rs")

    assert rejection(verifier, token).reason == "expired"


def test_token_expired_within_the_leeway_is_accepted(rsa_key: rsa.RSAPrivateKey) -> None:
    token = issuer_for(rsa_key, clock=lambda: time.time() - 310).issue(CLIENT, "system/*.rs")
    lenient = TokenVerifier({KID: rsa_key.public_key()}, ISSUER, AUDIENCE, leeway_s=60)

    assert lenient.verify(token).client_id == CLIENT


def test_token_not_yet_valid_is_rejected(verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    token = issuer_for(rsa_key, clock=lambda: time.time() + 3600).issue(CLIENT, "system/*.rs")

    assert rejection(verifier, token).reason == "not-yet-valid"


def test_token_with_nbf_in_the_future_is_rejected(verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    token = signed(rsa_key, access_claims(nbf=int(time.time()) + 600))

    error = rejection(verifier, token)

    assert error.reason == "not-yet-valid"
    assert "nbf" in error.detail


def test_token_for_another_audience_is_rejected(verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    token = issuer_for(rsa_key, audience="https://other.example.org/fhir").issue(CLIENT, "system/*.rs")

    assert rejection(verifier, token).reason == "wrong-audience"


def test_token_from_another_issuer_is_rejected(verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    token = issuer_for(rsa_key, issuer="https://other.example.org/auth").issue(CLIENT, "system/*.rs")

    assert rejection(verifier, token).reason == "wrong-issuer"


@pytest.mark.parametrize("scope", [None, ""])
def test_token_without_scope_claim_is_rejected(
    verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey, scope: str | None
) -> None:
    claims = access_claims()
    claims.pop("scope")
    if scope is not None:
        claims["scope"] = scope

    assert rejection(verifier, signed(rsa_key, claims)).reason == "missing-scope"


@pytest.mark.parametrize("scope", ["system/CarePlan.write.all", ["system/CarePlan.rs"]])
def test_token_with_an_invalid_scope_claim_is_rejected(
    verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey, scope: Any
) -> None:
    assert rejection(verifier, signed(rsa_key, access_claims(scope=scope))).reason == "invalid-scope"


@pytest.mark.parametrize("claim", ["exp", "iat", "sub", "jti", "aud", "iss"])
def test_token_missing_a_registered_claim_is_rejected(
    verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey, claim: str
) -> None:
    claims = access_claims()
    claims.pop(claim)

    error = rejection(verifier, signed(rsa_key, claims))

    assert error.reason == "missing-claim"
    assert claim in error.detail


@pytest.mark.parametrize("typ", ["JWT", "id+jwt", ""])
def test_token_that_is_not_an_access_token_is_rejected(
    verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey, typ: str
) -> None:
    assert rejection(verifier, signed(rsa_key, access_claims(), typ=typ)).reason == "wrong-type"


def test_token_whose_client_id_differs_from_its_subject_is_rejected(
    verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    assert rejection(verifier, signed(rsa_key, access_claims(client_id="someone-else"))).reason == "malformed"


# --- client assertions (SMART Backend Services) ----------------------------------------------------------------


@pytest.fixture(scope="module", params=["RS384", "ES384"])
def client_key(request: pytest.FixtureRequest) -> Key:
    if request.param == "RS384":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP384R1())


def jwks_of(*keys: tuple[str, Key]) -> dict[str, Any]:
    entries = []
    for kid, key in keys:
        if isinstance(key, rsa.RSAPrivateKey):
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
        else:
            jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
        entries.append({**jwk, "kid": kid})
    return {"keys": entries}


@pytest.fixture
def client_jwks(client_key: Key) -> dict[str, Any]:
    return jwks_of((CLIENT_KID, client_key))


def assertion_claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": CLIENT, "sub": CLIENT, "aud": TOKEN_URL, "exp": now + 240, "jti": uuid.uuid4().hex, **overrides}
    return {name: value for name, value in claims.items() if value is not None}


def client_assertion(key: Key, *, kid: str | None = CLIENT_KID, **overrides: Any) -> str:
    return signed(key, assertion_claims(**overrides), kid=kid, typ="JWT")


def assertion_rejection(
    assertion: str, jwks: dict[str, Any], seen: set[str] | None = None, **kwargs: Any
) -> TokenError:
    with pytest.raises(TokenError) as raised:
        verify_client_assertion(assertion, jwks, TOKEN_URL, seen if seen is not None else set(), **kwargs)
    return raised.value


def test_client_assertion_signed_by_a_registered_key_is_accepted_and_its_jti_remembered(
    client_key: Key, client_jwks: dict[str, Any]
) -> None:
    seen: set[str] = set()
    assertion = client_assertion(client_key, jti="jti-1")

    verified = verify_client_assertion(assertion, client_jwks, TOKEN_URL, seen, client_id=CLIENT)

    assert verified == ClientAssertion(
        CLIENT, "jti-1", jwt.decode(assertion, options={"verify_signature": False})["exp"]
    )
    assert seen == {"jti-1"}


def test_replayed_client_assertion_is_rejected(client_key: Key, client_jwks: dict[str, Any]) -> None:
    seen: set[str] = set()
    assertion = client_assertion(client_key)
    verify_client_assertion(assertion, client_jwks, TOKEN_URL, seen)

    assert assertion_rejection(assertion, client_jwks, seen).reason == "replayed"


def test_refused_client_assertion_does_not_use_up_its_jti(client_key: Key, client_jwks: dict[str, Any]) -> None:
    seen: set[str] = set()
    assertion_rejection(client_assertion(client_key, jti="jti-2", aud="https://elsewhere/token"), client_jwks, seen)

    verify_client_assertion(client_assertion(client_key, jti="jti-2"), client_jwks, TOKEN_URL, seen)

    assert seen == {"jti-2"}


def test_client_assertion_from_the_exchange_client_is_accepted(client_key: Key, client_jwks: dict[str, Any]) -> None:
    auth = SmartBackendAuth(
        "ehr-north", token_url=TOKEN_URL, client_id=CLIENT, private_key=client_key, key_id=CLIENT_KID
    )

    verified = verify_client_assertion(auth.client_assertion(), client_jwks, TOKEN_URL, set(), client_id=CLIENT)

    assert verified.client_id == CLIENT


def test_assertion_client_id_reads_the_issuer_before_verification(client_key: Key) -> None:
    assert assertion_client_id(client_assertion(client_key)) == CLIENT


def test_assertion_client_id_of_an_assertion_without_issuer_is_refused(client_key: Key) -> None:
    with pytest.raises(TokenError) as raised:
        assertion_client_id(client_assertion(client_key, iss=None))

    assert raised.value.reason == "missing-claim"


def test_client_assertion_with_alg_none_is_rejected(client_jwks: dict[str, Any]) -> None:
    assertion = forge({"alg": "none", "kid": CLIENT_KID, "typ": "JWT"}, assertion_claims())

    assert assertion_rejection(assertion, client_jwks).reason == "alg-none"


def test_hs256_client_assertion_signed_with_the_clients_public_key_is_rejected(
    client_key: Key, client_jwks: dict[str, Any]
) -> None:
    assertion = forge({"alg": "HS256", "kid": CLIENT_KID, "typ": "JWT"}, assertion_claims(), public_pem(client_key))

    assert assertion_rejection(assertion, client_jwks).reason == "alg-not-allowed"


def test_client_assertion_with_an_unknown_kid_is_rejected(client_key: Key, client_jwks: dict[str, Any]) -> None:
    assert assertion_rejection(client_assertion(client_key, kid="other-kid"), client_jwks).reason == "unknown-kid"


def test_client_assertion_signed_by_a_key_outside_the_jwks_is_rejected(
    client_key: Key, client_jwks: dict[str, Any]
) -> None:
    stranger: Key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if isinstance(client_key, rsa.RSAPrivateKey)
        else ec.generate_private_key(ec.SECP384R1())
    )

    assert assertion_rejection(client_assertion(stranger), client_jwks).reason == "bad-signature"


def test_client_assertion_whose_alg_is_not_that_of_the_registered_key_is_rejected(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    jwks = jwks_of((CLIENT_KID, rsa_key))

    assert assertion_rejection(client_assertion(ec_key), jwks).reason == "alg-not-allowed"


def test_client_assertion_with_sub_other_than_iss_is_rejected(client_key: Key, client_jwks: dict[str, Any]) -> None:
    assertion = client_assertion(client_key, sub="someone-else")

    assert assertion_rejection(assertion, client_jwks).reason == "wrong-subject"


def test_client_assertion_of_another_client_is_rejected(client_key: Key, client_jwks: dict[str, Any]) -> None:
    assertion = client_assertion(client_key, iss="ehr-south", sub="ehr-south")

    assert assertion_rejection(assertion, client_jwks, client_id=CLIENT).reason == "wrong-issuer"


def test_client_assertion_for_another_token_url_is_rejected(client_key: Key, client_jwks: dict[str, Any]) -> None:
    assertion = client_assertion(client_key, aud="https://other.example.org/auth/token")

    assert assertion_rejection(assertion, client_jwks).reason == "wrong-audience"


def test_client_assertion_valid_for_more_than_five_minutes_is_rejected(
    client_key: Key, client_jwks: dict[str, Any]
) -> None:
    assertion = client_assertion(client_key, exp=int(time.time()) + 3600)

    assert assertion_rejection(assertion, client_jwks).reason == "lifetime-too-long"


def test_expired_client_assertion_is_rejected(client_key: Key, client_jwks: dict[str, Any]) -> None:
    assertion = client_assertion(client_key, exp=int(time.time()) - 60)

    assert assertion_rejection(assertion, client_jwks).reason == "expired"


@pytest.mark.parametrize("claim", ["exp", "jti", "sub", "aud"])
def test_client_assertion_missing_a_required_claim_is_rejected(
    client_key: Key, client_jwks: dict[str, Any], claim: str
) -> None:
    error = assertion_rejection(client_assertion(client_key, **{claim: None}), client_jwks)

    assert error.reason == "missing-claim"
    assert claim in error.detail


def test_client_assertion_without_kid_uses_the_only_key_of_its_algorithm(
    client_key: Key, client_jwks: dict[str, Any]
) -> None:
    assertion = client_assertion(client_key, kid=None)

    assert verify_client_assertion(assertion, client_jwks, TOKEN_URL, set()).client_id == CLIENT


def test_client_assertion_without_kid_is_rejected_when_several_keys_could_have_signed(client_key: Key) -> None:
    twin: Key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if isinstance(client_key, rsa.RSAPrivateKey)
        else ec.generate_private_key(ec.SECP384R1())
    )
    jwks = jwks_of((CLIENT_KID, client_key), ("ehr-north-key-2", twin))

    assert assertion_rejection(client_assertion(client_key, kid=None), jwks).reason == "unknown-kid"


def test_client_key_registered_for_encryption_does_not_verify_assertions(client_key: Key) -> None:
    jwks = jwks_of((CLIENT_KID, client_key))
    jwks["keys"][0]["use"] = "enc"

    assert assertion_rejection(client_assertion(client_key), jwks).reason == "unknown-kid"


def test_symmetric_key_in_a_client_jwks_is_never_used(client_key: Key) -> None:
    secret = b"registered-as-a-shared-secret"
    jwks = {"keys": [{"kty": "oct", "kid": CLIENT_KID, "k": b64(secret)}]}
    assertion = forge({"alg": "HS256", "kid": CLIENT_KID, "typ": "JWT"}, assertion_claims(), secret)

    assert assertion_rejection(assertion, jwks).reason == "alg-not-allowed"
    assert assertion_rejection(client_assertion(client_key), jwks).reason == "unknown-kid"
