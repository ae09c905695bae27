"""The example instances of US Core 6.1.0 (../shared/us-core-6.1.0/examples), written by HL7, through the server:
each is PUT at its own id, read back unchanged, and `$validate` with its US Core profile as the `profile` parameter
finds no error, against the US Core StructureDefinitions the project vendors (profiles/us-core).

Storage is not what is tested here (tests/fhir/test_examples.py runs the same kind of corpus on both databases),
so one SQLite database holds them all.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import EXAMPLES
from flask.testing import FlaskClient

from iop_fhir.app import create_app
from iop_fhir.config import Settings
from iop_fhir.r4 import definitions

US_CORE_EXAMPLES = EXAMPLES.parent / "us-core-6.1.0" / "examples"
US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition/"
FHIR = "application/fhir+json"
# Resource types of the examples that the server does not support, with the reason: none (every example is an R4
# resource type, /fhir serves them all). Kept so that a type ever dropped is named here, not silently skipped.
UNSUPPORTED: dict[str, str] = {}
# Examples that are not valid FHIR R4, with the element the error is on and why: refused with 400 naming it, and
# $validate says the same (tests/fhir/test_examples.py lists the same example of the corpus in ../shared/fhir-examples).
INVALID: dict[str, tuple[str, str]] = {
    "diagnosticreport-cbc.json": (
        "DiagnosticReport.text.div",
        "Narrative.div is required (1..1) but the example's text has only a status",
    ),
}
# Examples whose profiles are not US Core's (SDC Questionnaire) or that claim none (the Bundles and the Media of the
# IG): they are stored and checked against R4 only.
EXAMPLES = sorted(US_CORE_EXAMPLES.glob("*.json")) if US_CORE_EXAMPLES.is_dir() else []


def _example(path: Path) -> dict[str, Any]:
    resource: dict[str, Any] = json.loads(path.read_text())
    return resource


def _errors(outcome: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        (i["code"], (i.get("expression") or [""])[0], i.get("diagnostics", ""))
        for i in outcome["issue"]
        if i["severity"] in ("error", "fatal")
    ]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> Iterator[FlaskClient]:
    path = tmp_path_factory.mktemp("us-core") / "iop_fhir.db"
    shutil.copy(sqlite_template, path)
    app = create_app(Settings(database_url=f"sqlite:///{path}", base_url="http://testserver/fhir"))
    app.config["TESTING"] = True
    yield app.test_client()
    app.extensions["iop_fhir.store"].close()


def test_the_us_core_examples_are_there_and_of_supported_types() -> None:
    assert len(EXAMPLES) > 150
    types = {_example(p)["resourceType"] for p in EXAMPLES}
    assert types - set(UNSUPPORTED) <= definitions.resource_types()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_a_us_core_example_is_stored_as_it_is_and_valid_against_its_us_core_profile(
    client: FlaskClient, path: Path
) -> None:
    resource = _example(path)
    res_type, res_id = resource["resourceType"], resource["id"]
    if res_type in UNSUPPORTED:
        pytest.skip(UNSUPPORTED[res_type])
    written = client.put(f"/fhir/{res_type}/{res_id}", json=resource, headers={"Content-Type": FHIR})
    if path.name in INVALID:
        expression = INVALID[path.name][0]
        assert written.status_code == 400
        assert [(i["code"], i["expression"]) for i in written.get_json()["issue"]] == [("required", [expression])]
        response = client.post(f"/fhir/{res_type}/$validate", json=resource, headers={"Content-Type": FHIR})
        assert [(c, e) for c, e, _ in _errors(response.get_json())] == [("required", expression)]
        return
    assert written.status_code in (200, 201), written.get_json()
    stored = client.get(f"/fhir/{res_type}/{res_id}").get_json()
    assert {k: v for k, v in stored.items() if k != "meta"} == {k: v for k, v in resource.items() if k != "meta"}
    claimed = [url for url in (resource.get("meta") or {}).get("profile", []) if url.startswith(US_CORE)]
    for url in claimed or [None]:
        query = f"?profile={quote(url, safe='')}" if url else ""
        response = client.post(f"/fhir/{res_type}/$validate{query}", json=resource, headers={"Content-Type": FHIR})
        assert response.status_code == 200, response.get_json()
        assert _errors(response.get_json()) == [], url


def test_validate_against_a_us_core_profile_reports_what_the_example_lacks(client: FlaskClient) -> None:
    patient = _example(US_CORE_EXAMPLES / "patient-example.json")
    del patient["identifier"]
    patient["name"] = [{"text": "Amy Shaw"}]
    race = next(e for e in patient["extension"] if e["url"] == US_CORE + "us-core-race")
    race["extension"] = [e for e in race["extension"] if e["url"] != "text"]
    response = client.post(
        f"/fhir/Patient/$validate?profile={US_CORE}us-core-patient", json=patient, headers={"Content-Type": FHIR}
    )
    assert sorted((c, e) for c, e, _ in _errors(response.get_json())) == [
        ("invariant", "Patient.name[0]"),
        ("required", f"Patient.extension('{US_CORE}us-core-race').extension"),
        ("required", "Patient.identifier"),
    ]
