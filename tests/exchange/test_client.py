"""PartnerClient and partner auth against `responses`: failure classification, paging, bearer and SMART backend auth."""

from __future__ import annotations

import email.utils
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
import pytest
import requests
import responses
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from responses import matchers

from iop_fhir.config import Settings
from iop_fhir.exchange import auth
from iop_fhir.exchange.auth import SmartBackendAuth, TokenCache, secret_env_var
from iop_fhir.exchange.client import USER_AGENT, DeliveryError, PartnerClient, parse_retry_after
from iop_fhir.exchange.partners import client_for

BASE = "https://fhir.partner.example/R4"
TOKEN_URL = "https://auth.partner.example/token"
PATIENT = {"resourceType": "Patient", "id": "p1", "name": [{"family": "Testperson"}]}
OUTCOME = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "required", "diagnostics": "Patient.gender is required"}],
}


@pytest.fixture
def session() -> requests.Session:
    return requests.Session()


@pytest.fixture
def mock() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=True) as rsps:
        yield rsps


@pytest.fixture(autouse=True)
def empty_token_cache() -> Iterator[None]:
    auth.TOKENS.clear()
    yield
    auth.TOKENS.clear()


def write_pem(path: Path, key: Any) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


@pytest.fixture(scope="module")
def rsa_private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture(params=["rsa", "ec"])
def signing_key(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Any, str]:
    """(PEM file written to tmp_path/keys, public key, expected JWS alg) for an RSA 2048 and an EC P-384 key."""
    key = request.getfixturevalue(f"{request.param}_private_key")
    (tmp_path / "keys").mkdir()
    pem = write_pem(tmp_path / "keys" / f"{request.param}.pem", key)
    return pem, key.public_key(), {"rsa": "RS384", "ec": "ES384"}[request.param]


def smart_partner(private_key_file: str, partner_id: str = "passaic-valley") -> dict[str, Any]:
    return {
        "id": partner_id,
        "kind": "aftercare-provider",
        "name": "Passaic Valley Recovery Services",
        "fhir_base_url": BASE,
        "auth": {
            "type": "smart-backend-services",
            "token_url": TOKEN_URL,
            "client_id": "iop-clifton",
            "private_key_file": private_key_file,
            "key_id": "iop-clifton-2026",
            "scope": "system/Task.cru system/ServiceRequest.c",
        },
    }


def bearer_partner(token_file: str, partner_id: str = "mercy-general") -> dict[str, Any]:
    return {
        "id": partner_id,
        "kind": "hospital-ehr",
        "name": "Mercy General",
        "fhir_base_url": BASE,
        "auth": {"type": "bearer", "token_file": token_file},
    }


def token_calls(mock: responses.RequestsMock) -> list[Any]:
    return [call for call in mock.calls if call.request.url == TOKEN_URL]


def fhir_calls(mock: responses.RequestsMock) -> list[Any]:
    return [call for call in mock.calls if call.request.url.startswith(BASE)]


def add_tokens(mock: responses.RequestsMock, *tokens: str, expires_in: int = 300) -> None:
    for token in tokens:
        mock.post(TOKEN_URL, json={"access_token": token, "token_type": "bearer", "expires_in": expires_in})


def http_date(moment: datetime) -> str:
    return email.utils.format_datetime(moment, usegmt=True)


# --- Classification


def _in_two_minutes() -> str:
    return http_date(datetime.now(UTC) + timedelta(seconds=120))


CLASSIFICATION = [
    # id, status or exception, headers, body, retryable (None: success), retry_after range, outcome kept
    ("200", 200, {}, PATIENT, None, None, False),
    ("201", 201, {"Location": f"{BASE}/Patient/p1/_history/1"}, PATIENT, None, None, False),
    ("400-outcome", 400, {}, OUTCOME, False, None, True),
    ("404", 404, {}, {"resourceType": "OperationOutcome", "issue": []}, False, None, True),
    ("409", 409, {}, OUTCOME, False, None, True),
    ("412", 412, {}, OUTCOME, False, None, True),
    ("422", 422, {}, OUTCOME, False, None, True),
    ("429-seconds", 429, {"Retry-After": "30"}, None, True, (30, 30), False),
    ("429-http-date", 429, {"Retry-After": _in_two_minutes}, None, True, (100, 121), False),
    ("500", 500, {}, OUTCOME, True, None, True),
    ("502", 502, {}, "<html>Bad Gateway</html>", True, None, False),
    ("503", 503, {"Retry-After": "5"}, None, True, (5, 5), False),
    ("connection-error", requests.ConnectionError("refused"), {}, None, True, None, False),
    ("read-timeout", requests.ReadTimeout("read timed out"), {}, None, True, None, False),
]


@pytest.mark.parametrize(
    ("answer", "headers", "body", "retryable", "retry_after", "outcome_kept"),
    [case[1:] for case in CLASSIFICATION],
    ids=[case[0] for case in CLASSIFICATION],
)
def test_partner_answers_are_classified_retryable_or_permanent(
    mock: responses.RequestsMock,
    session: requests.Session,
    answer: int | Exception,
    headers: dict[str, Any],
    body: Any,
    retryable: bool | None,
    retry_after: tuple[int, int] | None,
    outcome_kept: bool,
) -> None:
    headers = {name: value() if callable(value) else value for name, value in headers.items()}
    if isinstance(answer, Exception):
        mock.put(f"{BASE}/Patient/p1", body=answer)
    elif isinstance(body, dict):
        mock.put(f"{BASE}/Patient/p1", status=answer, json=body, headers=headers)
    else:
        mock.put(f"{BASE}/Patient/p1", status=answer, body=body or "", headers=headers)
    client = PartnerClient(BASE, session=session)

    if retryable is None:
        assert client.update("Patient/p1", PATIENT) == PATIENT
        return
    with pytest.raises(DeliveryError) as caught:
        client.update("Patient/p1", PATIENT)
    error = caught.value
    assert error.retryable is retryable
    assert error.status == (answer if isinstance(answer, int) else None)
    assert error.outcome == (body if outcome_kept else None)
    if retry_after is None:
        assert error.retry_after is None
    else:
        assert error.retry_after is not None and retry_after[0] <= error.retry_after <= retry_after[1]
    assert error.message.startswith("PUT fhir.partner.example/R4/Patient/p1")
    assert error.to_json() == {
        "status": error.status,
        "retryable": retryable,
        "message": error.message,
        "outcome": error.outcome,
        "retry_after": error.retry_after,
    }


def test_error_message_has_no_query_string_and_no_body(mock: responses.RequestsMock, session: requests.Session) -> None:
    mock.put(f"{BASE}/Patient", status=412, json=OUTCOME)
    mock.get(f"{BASE}/Observation", body=requests.ConnectionError(f"{BASE}/Observation?patient=Testperson"))
    client = PartnerClient(BASE, session=session)

    with pytest.raises(DeliveryError) as conditional:
        client.update("Patient?identifier=https://iop-fhir.org/fhir/sid/iop-record|enrollment/e1/patient", PATIENT)
    with pytest.raises(DeliveryError) as refused:
        list(client.search("Observation", {"patient": "Testperson"}))

    for error in (conditional.value, refused.value):
        assert "identifier" not in error.message and "Testperson" not in error.message
    assert (
        conditional.value.message == "PUT fhir.partner.example/R4/Patient answered 412 Precondition Failed "
        "(OperationOutcome: required)"
    )


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("120", 120.0),
        (" 0 ", 0.0),
        ("Wed, 21 Oct 2026 07:28:00 GMT", 60.0),
        ("Wed, 21 Oct 2026 07:26:00 GMT", 0.0),  # already past
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_is_read_as_delta_seconds_or_http_date(header: str | None, expected: float | None) -> None:
    now = datetime(2026, 10, 21, 7, 27, tzinfo=UTC)
    assert parse_retry_after(header, now=now) == expected


# --- Requests on the wire


def test_requests_send_fhir_json_and_the_user_agent(mock: responses.RequestsMock, session: requests.Session) -> None:
    response_bundle = {"resourceType": "Bundle", "type": "transaction-response", "entry": []}
    mock.post(BASE, json=response_bundle)
    mock.get(f"{BASE}/Patient/p1", json=PATIENT)
    client = PartnerClient(BASE + "/", session=session, timeout=3.5)

    assert client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": []}) == response_bundle
    assert client.read("Patient/p1") == PATIENT

    post, get = mock.calls
    assert post.request.url == BASE
    assert post.request.headers["Content-Type"] == "application/fhir+json"
    assert get.request.headers.get("Content-Type") is None
    for call in (post, get):
        assert call.request.headers["Accept"] == "application/fhir+json"
        assert call.request.headers["User-Agent"] == USER_AGENT
        assert call.request.headers.get("Authorization") is None
        assert call.request.req_kwargs["timeout"] == (3.5, 3.5)
    assert USER_AGENT.startswith("iop-fhir/")


def test_an_empty_success_body_is_an_empty_answer(mock: responses.RequestsMock, session: requests.Session) -> None:
    mock.put(f"{BASE}/Patient/p1", status=200, body="")
    assert PartnerClient(BASE, session=session).update("Patient/p1", PATIENT) == {}


def test_a_success_answer_that_is_not_json_is_a_permanent_error(
    mock: responses.RequestsMock, session: requests.Session
) -> None:
    mock.get(f"{BASE}/Patient/p1", status=200, body="<html>login</html>")
    with pytest.raises(DeliveryError) as caught:
        PartnerClient(BASE, session=session).read("Patient/p1")
    assert caught.value.retryable is False
    assert caught.value.status == 200


def test_a_redirect_is_not_followed_and_is_permanent(mock: responses.RequestsMock, session: requests.Session) -> None:
    mock.post(BASE, status=301, headers={"Location": "https://elsewhere.example/R4"})
    with pytest.raises(DeliveryError) as caught:
        PartnerClient(BASE, session=session).transaction({"resourceType": "Bundle", "type": "transaction"})
    assert (caught.value.status, caught.value.retryable) == (301, False)
    assert len(mock.calls) == 1


def test_calls_are_logged_at_debug_without_query_or_body(
    mock: responses.RequestsMock, session: requests.Session, caplog: pytest.LogCaptureFixture
) -> None:
    mock.get(f"{BASE}/Patient", json={"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": PATIENT}]})
    caplog.set_level(logging.DEBUG, logger="iop_fhir.exchange")

    list(PartnerClient(BASE, session=session).search("Patient", {"family": "Testperson"}))

    messages = [record.getMessage() for record in caplog.records if record.name.startswith("iop_fhir.exchange")]
    assert len(messages) == 1
    assert messages[0].startswith("GET fhir.partner.example/R4/Patient -> 200 in ")
    assert "Testperson" not in caplog.text


# --- Search paging


def searchset(resources: list[dict[str, Any]], next_url: str | None) -> dict[str, Any]:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": [{"relation": "self", "url": f"{BASE}/Observation"}],
        "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
    }
    if next_url:
        bundle["link"].append({"relation": "next", "url": next_url})
    return bundle


def observation(n: int) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": f"o{n}", "status": "final", "code": {"text": "test"}}


def test_search_follows_next_links_across_three_pages(mock: responses.RequestsMock, session: requests.Session) -> None:
    params = [("patient", "Patient/p1"), ("_lastUpdated", "gt2026-01-01T00:00:00Z")]
    page = f"{BASE}/Observation?_getpages=abc&_offset="
    mock.get(
        f"{BASE}/Observation",
        json=searchset([observation(1), observation(2)], page + "2"),
        match=[matchers.query_param_matcher(dict(params))],
    )
    page_2 = searchset([observation(3), observation(4)], page + "4")
    page_2["entry"].append(
        {"resource": {"resourceType": "OperationOutcome", "issue": []}, "search": {"mode": "outcome"}}
    )
    mock.get(
        f"{BASE}/Observation", json=page_2, match=[matchers.query_param_matcher({"_getpages": "abc", "_offset": "2"})]
    )
    mock.get(
        f"{BASE}/Observation",
        json=searchset([observation(5)], None),
        match=[matchers.query_param_matcher({"_getpages": "abc", "_offset": "4"})],
    )

    found = list(PartnerClient(BASE, session=session).search("Observation", params))

    assert [r["id"] for r in found] == ["o1", "o2", "o3", "o4", "o5"]
    assert len(mock.calls) == 3


def test_search_pages_are_fetched_only_as_they_are_consumed(
    mock: responses.RequestsMock, session: requests.Session
) -> None:
    mock.get(f"{BASE}/Observation", json=searchset([observation(1)], f"{BASE}/Observation?page=2"))
    results = PartnerClient(BASE, session=session).search("Observation", {})
    assert next(results)["id"] == "o1"
    assert len(mock.calls) == 1


@pytest.mark.parametrize(
    "next_url",
    [
        "https://evil.example/R4/Observation?page=2",
        "http://fhir.partner.example/R4/Observation?page=2",  # a downgrade to plain HTTP is another origin
        "https://fhir.partner.example:8443/R4/Observation?page=2",
    ],
)
def test_search_refuses_a_next_link_to_another_origin(
    mock: responses.RequestsMock, session: requests.Session, next_url: str
) -> None:
    mock.get(f"{BASE}/Observation", json=searchset([observation(1)], next_url))
    results = PartnerClient(BASE, session=session).search("Observation", {"patient": "Patient/p1"})

    assert next(results)["id"] == "o1"
    with pytest.raises(DeliveryError) as caught:
        next(results)
    assert caught.value.retryable is False
    assert "next link" in caught.value.message and "refused" in caught.value.message
    assert len(mock.calls) == 1


def test_search_refuses_next_links_that_loop(mock: responses.RequestsMock, session: requests.Session) -> None:
    again = f"{BASE}/Observation?page=2"
    mock.get(f"{BASE}/Observation", json=searchset([observation(1)], again))
    with pytest.raises(DeliveryError) as caught:
        list(PartnerClient(BASE, session=session).search("Observation", {}))
    assert caught.value.retryable is False
    assert len(mock.calls) == 2


# --- SMART backend services


def test_client_assertion_is_signed_per_key_type_with_smart_claims(
    mock: responses.RequestsMock, session: requests.Session, signing_key: tuple[Path, Any, str], tmp_path: Path
) -> None:
    pem, public_key, alg = signing_key
    add_tokens(mock, "tok-1")
    mock.get(f"{BASE}/Patient/p1", json=PATIENT)
    client = client_for(smart_partner(f"keys/{pem.name}"), Settings(secrets_dir=tmp_path), session=session)

    client.read("Patient/p1")

    (token_call,) = token_calls(mock)
    assert token_call.request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    form = {name: values[0] for name, values in parse_qs(token_call.request.body).items()}
    assert form["grant_type"] == "client_credentials"
    assert form["scope"] == "system/Task.cru system/ServiceRequest.c"
    assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assertion = form["client_assertion"]
    header = jwt.get_unverified_header(assertion)
    assert header["alg"] == alg
    assert header["kid"] == "iop-clifton-2026"
    assert header["typ"] == "JWT"
    claims = jwt.decode(assertion, public_key, algorithms=[alg], audience=TOKEN_URL)
    assert claims["iss"] == claims["sub"] == "iop-clifton"
    assert claims["aud"] == TOKEN_URL
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert claims["jti"]
    assert fhir_calls(mock)[0].request.headers["Authorization"] == "Bearer tok-1"


def test_every_client_assertion_has_a_new_jti(signing_key: tuple[Path, Any, str]) -> None:
    pem, public_key, alg = signing_key
    smart = SmartBackendAuth(
        "passaic-valley",
        token_url=TOKEN_URL,
        client_id="iop-clifton",
        private_key=auth.load_private_key(pem.read_bytes(), "passaic-valley", "test"),
    )
    ids = {
        jwt.decode(smart.client_assertion(), public_key, algorithms=[alg], audience=TOKEN_URL)["jti"] for _ in range(5)
    }
    assert len(ids) == 5


def test_access_token_is_cached_across_requests_and_clients(
    mock: responses.RequestsMock, session: requests.Session, signing_key: tuple[Path, Any, str], tmp_path: Path
) -> None:
    pem = signing_key[0]
    add_tokens(mock, "tok-1")
    mock.get(f"{BASE}/Patient/p1", json=PATIENT)
    settings = Settings(secrets_dir=tmp_path / "keys")

    client_for(smart_partner(pem.name), settings, session=session).read("Patient/p1")
    client_for(smart_partner(pem.name), settings, session=session).read("Patient/p1")

    assert len(token_calls(mock)) == 1
    assert [c.request.headers["Authorization"] for c in fhir_calls(mock)] == ["Bearer tok-1", "Bearer tok-1"]


def test_token_is_renewed_thirty_seconds_before_it_expires(
    mock: responses.RequestsMock, session: requests.Session, rsa_private_key: rsa.RSAPrivateKey
) -> None:
    now = [1_800_000_000.0]
    smart = SmartBackendAuth(
        "passaic-valley",
        token_url=TOKEN_URL,
        client_id="iop-clifton",
        private_key=rsa_private_key,
        session=session,
        cache=TokenCache(),
        clock=lambda: now[0],
    )
    add_tokens(mock, "tok-1", expires_in=90)
    add_tokens(mock, "tok-2", expires_in=90)
    mock.get(f"{BASE}/Patient/p1", json=PATIENT)
    client = PartnerClient(BASE, session=session, auth=smart)

    client.read("Patient/p1")
    now[0] += 59
    client.read("Patient/p1")
    now[0] += 2  # 61 s after the fetch: within 30 s of the 90 s expiry
    client.read("Patient/p1")

    assert len(token_calls(mock)) == 2
    assert [c.request.headers["Authorization"] for c in fhir_calls(mock)] == [
        "Bearer tok-1",
        "Bearer tok-1",
        "Bearer tok-2",
    ]


def test_a_401_drops_the_token_fetches_a_new_one_and_retries_once(
    mock: responses.RequestsMock, session: requests.Session, signing_key: tuple[Path, Any, str], tmp_path: Path
) -> None:
    add_tokens(mock, "tok-1", "tok-2")
    mock.get(f"{BASE}/Patient/p1", status=401)
    mock.get(f"{BASE}/Patient/p1", json=PATIENT)
    client = client_for(smart_partner(f"keys/{signing_key[0].name}"), Settings(secrets_dir=tmp_path), session=session)

    assert client.read("Patient/p1") == PATIENT

    assert len(token_calls(mock)) == 2
    assert [c.request.headers["Authorization"] for c in fhir_calls(mock)] == ["Bearer tok-1", "Bearer tok-2"]


def test_a_second_401_is_a_permanent_error(
    mock: responses.RequestsMock, session: requests.Session, signing_key: tuple[Path, Any, str], tmp_path: Path
) -> None:
    add_tokens(mock, "tok-1", "tok-2")
    mock.put(f"{BASE}/Patient/p1", status=401, json=OUTCOME)
    client = client_for(smart_partner(f"keys/{signing_key[0].name}"), Settings(secrets_dir=tmp_path), session=session)

    with pytest.raises(DeliveryError) as caught:
        client.update("Patient/p1", PATIENT)

    assert (caught.value.status, caught.value.retryable) == (401, False)
    assert caught.value.outcome == OUTCOME
    assert len(token_calls(mock)) == 2
    assert len(fhir_calls(mock)) == 2


def test_a_401_with_a_fixed_bearer_token_is_not_retried(
    mock: responses.RequestsMock, session: requests.Session, tmp_path: Path
) -> None:
    (tmp_path / "token").write_text("static-token\n")
    mock.get(f"{BASE}/Patient/p1", status=401)
    client = client_for(bearer_partner("token"), Settings(secrets_dir=tmp_path), session=session)
    with pytest.raises(DeliveryError) as caught:
        client.read("Patient/p1")
    assert (caught.value.status, caught.value.retryable) == (401, False)
    assert len(mock.calls) == 1


def test_token_endpoint_refusal_is_permanent_with_the_oauth_error(
    mock: responses.RequestsMock, session: requests.Session, signing_key: tuple[Path, Any, str], tmp_path: Path
) -> None:
    mock.post(
        TOKEN_URL,
        status=400,
        json={"error": "invalid_client", "error_description": "no key with kid iop-clifton-2026 is registered"},
    )
    client = client_for(smart_partner(f"keys/{signing_key[0].name}"), Settings(secrets_dir=tmp_path), session=session)

    with pytest.raises(DeliveryError) as caught:
        client.read("Patient/p1")

    error = caught.value
    assert (error.status, error.retryable) == (400, False)
    assert "passaic-valley" in error.message
    assert "invalid_client" in error.message
    assert "no key with kid iop-clifton-2026 is registered" in error.message
    assert fhir_calls(mock) == []


@pytest.mark.parametrize(
    "answer",
    [503, requests.ConnectionError("refused"), requests.ConnectTimeout("timed out")],
    ids=["503", "connection-error", "timeout"],
)
def test_token_endpoint_outage_is_retryable(
    mock: responses.RequestsMock,
    session: requests.Session,
    rsa_private_key: rsa.RSAPrivateKey,
    tmp_path: Path,
    answer: int | Exception,
) -> None:
    write_pem(tmp_path / "key.pem", rsa_private_key)
    if isinstance(answer, Exception):
        mock.post(TOKEN_URL, body=answer)
    else:
        mock.post(TOKEN_URL, status=answer, headers={"Retry-After": "10"})
    client = client_for(smart_partner("key.pem"), Settings(secrets_dir=tmp_path), session=session)

    with pytest.raises(DeliveryError) as caught:
        client.read("Patient/p1")

    assert caught.value.retryable is True
    assert caught.value.message.startswith("partner passaic-valley: token request POST auth.partner.example/token")
    if answer == 503:
        assert caught.value.retry_after == 10


def test_private_key_may_come_from_the_environment(
    mock: responses.RequestsMock,
    session: requests.Session,
    ec_private_key: ec.EllipticCurvePrivateKey,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pem = write_pem(tmp_path / "key.pem", ec_private_key).read_text()
    monkeypatch.setenv("IOP_FHIR_PARTNER_PASSAIC_VALLEY_PRIVATE_KEY", pem)
    add_tokens(mock, "tok-1")
    mock.get(f"{BASE}/Patient/p1", json=PATIENT)

    client = client_for(smart_partner("not-there.pem"), Settings(secrets_dir=tmp_path / "nowhere"), session=session)
    client.read("Patient/p1")

    assertion = parse_qs(token_calls(mock)[0].request.body)["client_assertion"][0]
    assert jwt.get_unverified_header(assertion)["alg"] == "ES384"


# --- Secrets


def test_bearer_token_is_read_from_a_file_under_the_secrets_dir(
    mock: responses.RequestsMock, session: requests.Session, tmp_path: Path
) -> None:
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "mercy.token").write_text("file-token\n")
    mock.get(f"{BASE}/Patient/p1", json=PATIENT)

    client_for(bearer_partner("tokens/mercy.token"), Settings(secrets_dir=tmp_path), session=session).read("Patient/p1")

    assert mock.calls[0].request.headers["Authorization"] == "Bearer file-token"


def test_bearer_token_may_come_from_the_environment(
    mock: responses.RequestsMock, session: requests.Session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IOP_FHIR_PARTNER_MERCY_GENERAL_TOKEN", "env-token")
    mock.get(f"{BASE}/Patient/p1", json=PATIENT)

    client_for(bearer_partner("tokens/absent.token"), Settings(secrets_dir=tmp_path), session=session).read(
        "Patient/p1"
    )

    assert mock.calls[0].request.headers["Authorization"] == "Bearer env-token"


def test_secret_env_var_names_upper_case_the_id_and_replace_other_characters() -> None:
    assert secret_env_var("mercy-general.er", "TOKEN") == "IOP_FHIR_PARTNER_MERCY_GENERAL_ER_TOKEN"
    assert secret_env_var("Passaic-Valley", "PRIVATE_KEY") == "IOP_FHIR_PARTNER_PASSAIC_VALLEY_PRIVATE_KEY"


def test_missing_key_file_is_a_permanent_error_naming_partner_file_and_env_var(tmp_path: Path) -> None:
    with pytest.raises(DeliveryError) as caught:
        client_for(smart_partner("keys/passaic-valley.pem"), Settings(secrets_dir=tmp_path))
    error = caught.value
    assert error.retryable is False
    assert error.status is None
    assert "passaic-valley" in error.message
    assert str(tmp_path / "keys" / "passaic-valley.pem") in error.message
    assert "IOP_FHIR_PARTNER_PASSAIC_VALLEY_PRIVATE_KEY" in error.message


def test_missing_bearer_token_file_is_a_permanent_error(tmp_path: Path) -> None:
    with pytest.raises(DeliveryError) as caught:
        client_for(bearer_partner("mercy.token"), Settings(secrets_dir=tmp_path))
    assert caught.value.retryable is False
    assert "mercy-general" in caught.value.message and "IOP_FHIR_PARTNER_MERCY_GENERAL_TOKEN" in caught.value.message


def test_a_file_that_is_not_a_pem_key_is_refused_without_showing_it(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n")
    with pytest.raises(DeliveryError) as caught:
        client_for(smart_partner("key.pem"), Settings(secrets_dir=tmp_path))
    assert caught.value.retryable is False
    assert "passaic-valley" in caught.value.message and "does not hold an unencrypted PEM private key" in str(
        caught.value
    )
    assert "c2VjcmV0" not in caught.value.message


@pytest.mark.parametrize(
    ("make_key", "named"),
    [
        (lambda: ec.generate_private_key(ec.SECP256R1()), "secp256r1"),
        (ed25519.Ed25519PrivateKey.generate, "Ed25519"),
    ],
    ids=["ec-p256", "ed25519"],
)
def test_keys_other_than_rsa_or_ec_p384_are_refused_naming_the_partner(
    tmp_path: Path, make_key: Any, named: str
) -> None:
    key = make_key()
    write_pem(tmp_path / "key.pem", key)
    with pytest.raises(DeliveryError) as caught:
        client_for(smart_partner("key.pem"), Settings(secrets_dir=tmp_path))
    assert caught.value.retryable is False
    assert "passaic-valley" in caught.value.message
    assert named in caught.value.message
    assert "RS384" in caught.value.message and "ES384" in caught.value.message
    assert "BEGIN" not in caught.value.message


def test_a_partner_without_auth_sends_no_authorization(mock: responses.RequestsMock, session: requests.Session) -> None:
    partner = {"id": "open-unit", "kind": "inpatient-unit", "name": "Open", "fhir_base_url": BASE}
    mock.get(f"{BASE}/Patient/p1", json=PATIENT)
    client_for(partner, Settings(), session=session).read("Patient/p1")
    assert "Authorization" not in mock.calls[0].request.headers


def test_client_uses_the_partner_timeout_setting(mock: responses.RequestsMock, session: requests.Session) -> None:
    partner = {"id": "open-unit", "kind": "inpatient-unit", "name": "Open", "fhir_base_url": BASE}
    partner["auth"] = {"type": "none"}
    settings = Settings.from_env({"IOP_FHIR_PARTNER_TIMEOUT": "2.5", "IOP_FHIR_SECRETS_DIR": "/run/secrets"})
    assert settings.secrets_dir == Path("/run/secrets")
    mock.get(f"{BASE}/Patient/p1", json=PATIENT)

    client_for(partner, settings, session=session).read("Patient/p1")

    assert mock.calls[0].request.req_kwargs["timeout"] == (2.5, 2.5)
