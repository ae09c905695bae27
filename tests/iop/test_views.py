"""The /iop views, with the service replaced: request parsing, the one service call, statuses, media types, errors."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from iop_fhir import openapi
from iop_fhir.errors import Conflict, NotFound
from iop_fhir.iop import schemas, service

CONTRACT = Path(__file__).resolve().parents[3] / "shared" / "contract"
JSON = "application/json"


def contract(kind: str) -> dict[str, Any]:
    # A group session names three enrollments ({{enrollment_id}}, {{enrollment_id_2}}, ...): each its own id.
    text = re.sub(
        r"\{\{enrollment_id(_[0-9]+)?\}\}", lambda _: str(uuid.uuid4()), (CONTRACT / f"{kind}.json").read_text()
    )
    payload: dict[str, Any] = json.loads(text)
    return payload


class Calls:
    """Stands in for the service: records every call, answers with a canned body."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.created = True
        self.error: Exception | None = None
        for name in ("create", "get", "list_records", "update", "retract"):
            monkeypatch.setattr(service, name, self._stand_in(name))

    def _stand_in(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            if self.error is not None:
                raise self.error
            body = {"kind": args[0], "id": "r1", "status": "active"}
            return (body, self.created) if name == "create" else body

        return call


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    return Calls(monkeypatch)


@pytest.fixture
def client(sqlite_client: FlaskClient) -> FlaskClient:
    return sqlite_client


def assert_outcome(response: Any, status: int, code: str, expression: str | None = None) -> str:
    assert response.status_code == status
    assert response.mimetype == JSON
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome"
    issue = body["issue"][0]
    assert issue["code"] == code
    assert issue.get("expression") == ([expression] if expression else None)
    diagnostics: str = issue["diagnostics"]
    return diagnostics


@pytest.mark.parametrize("kind", schemas.KINDS)
def test_a_valid_record_is_created_through_the_service_as_loaded(client: FlaskClient, calls: Calls, kind: str) -> None:
    payload = contract(kind)
    response = client.post(f"/iop/{schemas.PLURALS[kind]}", json=payload)
    assert response.status_code == 201
    assert response.mimetype == JSON
    assert response.get_json() == {"kind": kind, "id": "r1", "status": "active"}
    assert response.headers["Location"] == f"/iop/{schemas.PLURALS[kind]}/r1"
    assert calls.calls == [("create", (kind, payload), {})]


def test_a_replayed_record_answers_200(client: FlaskClient, calls: Calls) -> None:
    calls.created = False
    response = client.post("/iop/sessions", json=contract("session"))
    assert response.status_code == 200
    assert "Location" not in response.headers


def test_malformed_json_is_a_400_operation_outcome_in_application_json(client: FlaskClient, calls: Calls) -> None:
    response = client.post("/iop/sessions", data=b'{"service": ', content_type=JSON)
    assert "not valid JSON" in assert_outcome(response, 400, "structure")
    assert calls.calls == []


def test_an_empty_body_is_a_400(client: FlaskClient, calls: Calls) -> None:
    response = client.post("/iop/sessions", data=b"  ", content_type=JSON)
    assert "empty" in assert_outcome(response, 400, "structure")


@pytest.mark.parametrize("content_type", ["text/plain", "application/fhir+json", "application/x-www-form-urlencoded"])
def test_a_body_that_is_not_application_json_is_a_415(client: FlaskClient, calls: Calls, content_type: str) -> None:
    response = client.post("/iop/sessions", data=json.dumps(contract("session")), content_type=content_type)
    assert content_type in assert_outcome(response, 415, "not-supported", "Content-Type")
    assert calls.calls == []


def test_a_schema_error_is_a_400_naming_the_field_and_the_service_is_not_called(
    client: FlaskClient, calls: Calls
) -> None:
    payload = contract("session")
    payload["drug_screen"]["results"][2]["analyte"] = 7
    response = client.post("/iop/sessions", json=payload)
    assert "must be a string" in assert_outcome(response, 400, "structure", "drug_screen.results[2].analyte")
    assert calls.calls == []


def test_a_body_that_is_not_an_object_is_one_issue_without_expression(client: FlaskClient, calls: Calls) -> None:
    response = client.post("/iop/consents", json=[contract("consent")])
    assert "must be a JSON object" in assert_outcome(response, 400, "structure")
    assert len(response.get_json()["issue"]) == 1


def test_every_schema_problem_is_one_issue(client: FlaskClient, calls: Calls) -> None:
    payload = contract("session")
    payload.update(craving_score=12, mood="fine")
    response = client.post("/iop/sessions", json=payload)
    issues = {(i["code"], i["expression"][0]) for i in response.get_json()["issue"]}
    assert issues == {("value", "craving_score"), ("structure", "mood")}


def test_a_list_passes_enrollment_offset_and_count_to_the_service(client: FlaskClient, calls: Calls) -> None:
    assert client.get("/iop/sessions?enrollment=e-1&offset=40&count=10").status_code == 200
    assert client.get("/iop/treatment-plans").status_code == 200
    assert calls.calls == [
        ("list_records", ("session",), {"enrollment_id": "e-1", "offset": 40, "count": 10}),
        ("list_records", ("treatment-plan",), {"enrollment_id": None, "offset": 0, "count": 20}),
    ]


@pytest.mark.parametrize(
    ("query", "parameter", "fragment"),
    [
        ("count=ten", "count", "count must be a non-negative integer, got 'ten'"),
        ("count=-1", "count", "count must be a non-negative integer"),
        ("count=1001", "count", "count must be at most 1000, got 1001"),
        ("offset=1.5", "offset", "offset must be a non-negative integer"),
        ("count=1&count=2", "count", "count is given more than once"),
        ("enrollment=a%20b", "enrollment", "enrollment must be an enrollment id"),
        ("patient=p1", "patient", "unknown query parameter 'patient'; allowed: enrollment, offset, count"),
    ],
)
def test_a_bad_list_parameter_is_a_400_naming_it(
    client: FlaskClient, calls: Calls, query: str, parameter: str, fragment: str
) -> None:
    response = client.get(f"/iop/sessions?{query}")
    assert fragment in assert_outcome(response, 400, "invalid", parameter)
    assert calls.calls == []


def test_a_record_is_read_through_the_service(client: FlaskClient, calls: Calls) -> None:
    response = client.get("/iop/assessments/a-1")
    assert response.status_code == 200
    assert response.mimetype == JSON
    assert calls.calls == [("get", ("assessment", "a-1"), {})]


def test_an_id_that_cannot_be_a_record_id_is_not_found_without_asking_the_service(
    client: FlaskClient, calls: Calls
) -> None:
    response = client.get("/iop/sessions/" + "x" * 65)
    assert "no session record" in assert_outcome(response, 404, "not-found", "id")
    assert calls.calls == []


def test_an_update_is_loaded_and_passed_with_its_id(client: FlaskClient, calls: Calls) -> None:
    payload = contract("treatment-plan")
    response = client.put("/iop/treatment-plans/tp-1", json=payload)
    assert response.status_code == 200
    assert calls.calls == [("update", ("treatment-plan", "tp-1", payload), {})]


def test_a_partner_update_may_not_change_the_partner_id(client: FlaskClient, calls: Calls) -> None:
    response = client.put("/iop/partners/another-partner", json=contract("partner"))
    assert "must equal the id in the URL" in assert_outcome(response, 400, "invariant", "id")
    assert calls.calls == []
    assert client.put("/iop/partners/passaic-valley-recovery", json=contract("partner")).status_code == 200


def test_a_retraction_passes_its_optional_reason(client: FlaskClient, calls: Calls) -> None:
    assert client.post("/iop/sessions/s-1/retract").status_code == 200
    assert client.post("/iop/sessions/s-1/retract", json={"reason": "wrong patient"}).status_code == 200
    assert calls.calls == [
        ("retract", ("session", "s-1", None), {}),
        ("retract", ("session", "s-1", "wrong patient"), {}),
    ]


def test_a_retraction_body_with_other_fields_is_rejected(client: FlaskClient, calls: Calls) -> None:
    response = client.post("/iop/sessions/s-1/retract", json={"why": "wrong patient"})
    assert "allowed fields: reason" in assert_outcome(response, 400, "structure", "why")
    assert calls.calls == []


def test_partners_cannot_be_retracted(client: FlaskClient, calls: Calls) -> None:
    assert_outcome(client.post("/iop/partners/passaic-valley-recovery/retract"), 404, "not-found")


def test_service_errors_are_operation_outcomes_in_application_json(client: FlaskClient, calls: Calls) -> None:
    calls.error = NotFound("there is no session record with id s-9", "id")
    assert_outcome(client.get("/iop/sessions/s-9"), 404, "not-found", "id")
    calls.error = Conflict("the record was retracted")
    assert_outcome(client.put("/iop/sessions/s-9", json=contract("session")), 409, "conflict")


def test_an_unexpected_error_is_a_500_operation_outcome_in_application_json(client: FlaskClient, calls: Calls) -> None:
    calls.error = RuntimeError("boom")
    assert_outcome(client.get("/iop/sessions/s-1"), 500, "exception")


def test_unknown_paths_and_methods_under_iop_answer_in_application_json(client: FlaskClient) -> None:
    assert_outcome(client.get("/iop/patients"), 404, "not-found")
    response = client.delete("/iop/sessions/s-1")
    assert_outcome(response, 405, "not-supported")
    assert "PUT" in response.headers["Allow"]


def test_fhir_errors_keep_the_fhir_media_type(client: FlaskClient) -> None:
    assert client.get("/fhir/Patient/nothing-here").mimetype == "application/fhir+json"


def test_the_openapi_document_describes_each_request_body_with_its_schema(sqlite_app: Flask) -> None:
    spec = sqlite_app.extensions["iop_fhir.api"].spec.to_dict()
    assert spec["openapi"] == "3.1.0"
    assert spec["info"] == {"title": "iop-fhir", "version": "0.1.0"}
    for kind in schemas.KINDS:
        name = schemas.SCHEMAS[kind].__name__.removesuffix("Schema")
        collection = spec["paths"][f"/iop/{schemas.PLURALS[kind]}"]
        assert collection["post"]["requestBody"]["content"][JSON]["schema"] == {"$ref": f"#/components/schemas/{name}"}
        assert set(spec["paths"][f"/iop/{schemas.PLURALS[kind]}/{{record_id}}"]) >= {"get", "put"}
    session = spec["components"]["schemas"]["Session"]
    assert session["additionalProperties"] is False
    assert session["properties"]["craving_score"] == {"type": "integer", "minimum": 0, "maximum": 10}
    assert "/iop/partners/{record_id}/retract" not in spec["paths"]


def test_the_openapi_document_says_every_operation_needs_a_bearer_token(sqlite_app: Flask) -> None:
    spec = openapi.document(sqlite_app)
    assert spec["security"] == [{"bearer": []}]
    bearer = spec["components"]["securitySchemes"]["bearer"]
    assert (bearer["type"], bearer["scheme"], bearer["bearerFormat"]) == ("http", "bearer", "JWT")
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if path.startswith("/iop") and method in openapi.METHODS:
                assert "security" not in operation, (method, path)
                assert operation["responses"]["401"] == {"$ref": "#/components/responses/IopUnauthorized"}
    assert "/iop/enrollments/{record_id}/disclosures" in spec["paths"]
