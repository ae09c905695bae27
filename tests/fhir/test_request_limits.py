"""What a request may be, whatever its framing (iop_fhir/limits.py): a body over the limit is 413 whether it comes with
a Content-Length or chunked, and nothing cut at the limit is ever processed; a request target over the limit is 414;
a query string that is not UTF-8 is 400; duplicate JSON keys are 400; every error is an OperationOutcome."""

from __future__ import annotations

import io
from typing import Any

import orjson
import pytest
from flask.testing import FlaskClient

from iop_fhir.limits import MAX_TARGET_BYTES

FHIR = "application/fhir+json"
FORM = "application/x-www-form-urlencoded"
LIMIT = 10_000


def outcome_issue(response: Any) -> tuple[str, str | None]:
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome", body
    issue = body["issue"][0]
    return issue["code"], (issue.get("expression") or [None])[0]


def chunked(client: FlaskClient, method: str, path: str, body: bytes, content_type: str) -> Any:
    """A request whose body has no Content-Length, as a server that de-chunks it hands it to the app."""
    return client.open(
        path,
        method=method,
        input_stream=io.BytesIO(body),
        content_type=content_type,
        headers={"Transfer-Encoding": "chunked"},
        environ_base={"wsgi.input_terminated": True},
    )


def patient(family: str = "Rivera") -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": family}]}


def patients(client: FlaskClient) -> list[Any]:
    return client.get("/fhir/Patient").get_json().get("entry", [])


@pytest.fixture
def small(sqlite_client: FlaskClient) -> FlaskClient:
    sqlite_client.application.config["MAX_CONTENT_LENGTH"] = LIMIT
    return sqlite_client


def test_chunked_body_over_the_limit_is_413_and_nothing_is_stored(small: FlaskClient) -> None:
    body = orjson.dumps(patient()) + b" " * (LIMIT + 5000)
    response = chunked(small, "POST", "/fhir/Patient", body, FHIR)
    assert response.status_code == 413
    assert outcome_issue(response) == ("too-costly", "body")
    assert patients(small) == []


def test_chunked_body_one_byte_over_the_limit_is_413(small: FlaskClient) -> None:
    resource = orjson.dumps(patient())
    body = resource + b" " * (LIMIT + 1 - len(resource))
    assert chunked(small, "POST", "/fhir/Patient", body, FHIR).status_code == 413
    assert patients(small) == []


def test_chunked_body_at_the_limit_is_processed_whole(small: FlaskClient) -> None:
    resource = orjson.dumps(patient())
    body = resource + b" " * (LIMIT - len(resource))
    response = chunked(small, "POST", "/fhir/Patient", body, FHIR)
    assert response.status_code == 201
    assert response.get_json()["name"] == [{"family": "Rivera"}]


def test_chunked_search_body_over_the_limit_is_413_not_searched_without_its_last_parameters(
    small: FlaskClient,
) -> None:
    assert small.post("/fhir/Patient", data=orjson.dumps(patient()), content_type=FHIR).status_code == 201
    padding = "_count=5&" * (LIMIT // 9)
    body = (padding + "family=Nobody").encode()
    assert len(body) > LIMIT
    response = chunked(small, "POST", "/fhir/Patient/_search", body, FORM)
    assert response.status_code == 413
    assert outcome_issue(response) == ("too-costly", "body")


def test_chunked_search_body_under_the_limit_keeps_its_last_parameter(small: FlaskClient) -> None:
    assert small.post("/fhir/Patient", data=orjson.dumps(patient()), content_type=FHIR).status_code == 201
    body = ("_count=5&" * 100 + "family=Nobody").encode()
    response = chunked(small, "POST", "/fhir/Patient/_search", body, FORM)
    assert response.status_code == 200
    assert response.get_json().get("entry", []) == []


def test_content_length_over_the_limit_is_413_on_any_route(small: FlaskClient) -> None:
    body = b"x" * (LIMIT + 1)
    for method, path in (("POST", "/fhir/Patient"), ("GET", "/fhir/Patient"), ("POST", "/iop/sessions")):
        response = small.open(path, method=method, data=body, content_type=FHIR)
        assert response.status_code == 413, (method, path)
        assert outcome_issue(response) == ("too-costly", "body")


def test_request_target_over_the_limit_is_414_operation_outcome(sqlite_client: FlaskClient) -> None:
    response = sqlite_client.get("/fhir/Patient?family=" + "a" * MAX_TARGET_BYTES)
    assert response.status_code == 414
    assert response.mimetype == FHIR
    assert outcome_issue(response) == ("too-costly", "url")


def test_request_target_at_the_limit_is_answered(sqlite_client: FlaskClient) -> None:
    prefix = "/fhir/Patient?family="
    response = sqlite_client.get(prefix + "a" * (MAX_TARGET_BYTES - len(prefix)))
    assert response.status_code == 200


@pytest.mark.parametrize("query", ["family=%ff%fe", "family=a%C3", "family=%e9t%e9", "_count=5&family=%80"])
def test_query_value_that_is_not_utf8_is_400_naming_the_parameter(sqlite_client: FlaskClient, query: str) -> None:
    response = sqlite_client.get(f"/fhir/Patient?{query}")
    assert response.status_code == 400
    assert outcome_issue(response) == ("invalid", "family")


def test_query_name_that_is_not_utf8_is_400(sqlite_client: FlaskClient) -> None:
    response = sqlite_client.get("/fhir/Patient?fam%ffily=a")
    assert response.status_code == 400
    assert outcome_issue(response)[0] == "invalid"


@pytest.mark.parametrize("path", ["/fhir/Patient", "/iop/partners"])
def test_a_value_that_is_not_utf8_with_no_parameter_name_is_400_naming_the_query(
    sqlite_client: FlaskClient, path: str
) -> None:
    response = sqlite_client.get(f"{path}?=%FF")
    assert response.status_code == 400
    issue = response.get_json()["issue"][0]
    assert (issue["code"], issue["expression"]) == ("invalid", ["query"])


def test_query_with_utf8_percent_encoding_is_searched(sqlite_client: FlaskClient) -> None:
    created = sqlite_client.post("/fhir/Patient", data=orjson.dumps(patient("Müller")), content_type=FHIR)
    assert created.status_code == 201
    found = sqlite_client.get("/fhir/Patient?family=M%C3%BCller").get_json()
    assert [e["resource"]["id"] for e in found["entry"]] == [created.get_json()["id"]]


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (b'{"resourceType": "Patient", "name": [{"family": "A", "family": "B"}]}', "Patient.name[0].family"),
        (b'{"resourceType": "Patient", "gender": "male", "gender": "female"}', "Patient.gender"),
        (b'{"resourceType": "Patient", "resourceType": "Patient"}', "Patient.resourceType"),
    ],
)
def test_duplicate_json_key_is_400_naming_its_path(sqlite_client: FlaskClient, body: bytes, path: str) -> None:
    response = sqlite_client.post("/fhir/Patient", data=body, content_type=FHIR)
    assert response.status_code == 400
    assert outcome_issue(response) == ("structure", path)
    assert patients(sqlite_client) == []


def test_duplicate_json_key_inside_a_transaction_entry_is_400_naming_its_path(sqlite_client: FlaskClient) -> None:
    entry = b'{"resource": {"resourceType": "Patient", "active": true, "active": false}, '
    entry += b'"request": {"method": "POST", "url": "Patient"}}'
    body = b'{"resourceType": "Bundle", "type": "transaction", "entry": [' + entry + b"]}"
    response = sqlite_client.post("/fhir", data=body, content_type=FHIR)
    assert response.status_code == 400
    assert outcome_issue(response) == ("structure", "Bundle.entry[0].resource.active")
    assert patients(sqlite_client) == []


def test_same_key_in_different_objects_is_accepted(sqlite_client: FlaskClient) -> None:
    resource = {"resourceType": "Patient", "name": [{"family": "A"}, {"family": "B"}]}
    response = sqlite_client.post("/fhir/Patient", data=orjson.dumps(resource), content_type=FHIR)
    assert response.status_code == 201


def test_parameters_ignored_under_lenient_handling_count_toward_the_parameter_cap(sqlite_client: FlaskClient) -> None:
    query = "&".join(f"bogus{i}=x" for i in range(40))
    response = sqlite_client.get(f"/fhir/Patient?{query}", headers={"Prefer": "handling=lenient"})
    assert response.status_code == 400
    assert outcome_issue(response) == ("too-costly", "bogus32")


def test_lenient_search_at_the_parameter_cap_is_answered(sqlite_client: FlaskClient) -> None:
    query = "&".join(f"bogus{i}=x" for i in range(32))
    response = sqlite_client.get(f"/fhir/Patient?{query}", headers={"Prefer": "handling=lenient"})
    assert response.status_code == 200
