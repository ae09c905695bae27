"""Public paths are public only for the views they name: the same URL with another method is an ordinary FHIR
interaction (DELETE /fhir/metadata is a delete of type "metadata") and needs a token like any other."""

from __future__ import annotations

import pytest
from flask.testing import FlaskClient

OTHER_METHODS = [
    ("DELETE", "/fhir/.well-known/smart-configuration"),
    ("PUT", "/fhir/.well-known/smart-configuration"),
    ("POST", "/fhir/metadata"),
    ("DELETE", "/fhir/metadata"),
    ("PUT", "/fhir/metadata"),
]


@pytest.mark.parametrize(("method", "path"), OTHER_METHODS)
def test_another_method_on_a_public_fhir_path_needs_a_token(anonymous: FlaskClient, method: str, path: str) -> None:
    response = anonymous.open(path, method=method, json={"resourceType": "Patient"})
    assert response.status_code == 401
    assert response.json["issue"][0]["expression"] == ["Authorization"]


@pytest.mark.parametrize(("method", "path"), OTHER_METHODS)
def test_another_method_on_a_public_fhir_path_is_an_unknown_resource_type(
    sqlite_client: FlaskClient, method: str, path: str
) -> None:
    response = sqlite_client.open(path, method=method, json={"resourceType": "Patient"})
    assert response.status_code == 404
    assert response.json["issue"][0]["code"] == "not-supported"


@pytest.mark.parametrize("method", ["DELETE", "PUT", "POST"])
def test_a_public_path_routed_nowhere_for_a_method_answers_405_without_a_token(
    anonymous: FlaskClient, method: str
) -> None:
    response = anonymous.open("/health", method=method)
    assert response.status_code == 405
    assert response.headers["Allow"]
    assert response.json["resourceType"] == "OperationOutcome"
