"""Real FHIR written by others (../shared/fhir-examples), stored and found again, on SQLite and PostgreSQL.

Every example is PUT at its own id (create-on-update, https://hl7.org/fhir/R4/http.html#upsert), read
back unchanged, found by its patient and by its codes with exactly the expected ids (computed here from the
corpus, not by the server), and listed by history. The few genuinely invalid examples are refused with their
path; the list is checked against the independent validator (../shared/tools/fhir-validate).

The corpus is loaded once per database (a module fixture) rather than per test: about 870 resources.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import orjson
import pytest
from conftest import EXAMPLES, _empty_postgres
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from iop_fhir.app import create_app
from iop_fhir.config import Settings

FHIR = "application/fhir+json"
BASE = "http://testserver/fhir"
VALIDATOR = EXAMPLES.parent / "tools" / "fhir-validate"
JSON_FOLDERS = ("us-core", "ds4p", "opioid-cds-drug-screens")
SYNTHEA = "synthea-10-patients"
SMALL_NDJSON = 200  # files with at most this many lines are used whole
SAMPLE = 50  # lines taken, evenly spread, from each larger file

# Examples that are not valid FHIR R4, with the element the error is on and why. Each must be refused with 400
# and that expression; test_the_invalid_list_is_exactly_what_the_independent_validator_refuses checks it.
INVALID: dict[str, tuple[str, str]] = {
    "us-core/diagnosticreport-cbc.json": (
        "DiagnosticReport.text.div",
        "Narrative.div is required (1..1) but the example's text has only a status",
    ),
}

# The element the R4 `patient` search parameter reads, per type (search-parameters.json:
# `X.subject.where(resolve() is Patient)`, `X.patient`, `Coverage.beneficiary`); `subject` is one too.
PATIENT_ELEMENT = {
    **dict.fromkeys(
        ["AllergyIntolerance", "Device", "FamilyMemberHistory", "Immunization", "RelatedPerson"], "patient"
    ),
    "Coverage": "beneficiary",
    **dict.fromkeys(
        [
            "CarePlan",
            "CareTeam",
            "Condition",
            "DiagnosticReport",
            "DocumentReference",
            "Encounter",
            "Goal",
            "Media",
            "MedicationDispense",
            "MedicationRequest",
            "Observation",
            "Procedure",
            "QuestionnaireResponse",
            "ServiceRequest",
            "Specimen",
        ],
        "subject",
    ),
}
_PATIENT_REF = re.compile(r"^Patient/[A-Za-z0-9\-.]{1,64}$")


def _concepts(*elements: str) -> Callable[[dict[str, Any]], list[dict[str, Any]]]:
    """The Codings under the named CodeableConcept elements (each may repeat; 'a.b' walks one level down)."""

    def codings(resource: dict[str, Any]) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for path in elements:
            values: list[Any] = [resource]
            for step in path.split("."):
                values = [v for x in values for v in _as_list(x.get(step) if isinstance(x, dict) else None)]
            found.extend(c for v in values for c in _as_list(v.get("coding")))
        return found

    return codings


def _top_level_item_codes(resource: dict[str, Any]) -> list[dict[str, Any]]:
    # Questionnaire.item.code: Codings of the first-level items only (FHIRPath does not descend further).
    return [c for item in _as_list(resource.get("item")) for c in _as_list(item.get("code"))]


# The Codings the R4 `code` search parameter reads, per type (search-parameters.json expressions).
CODE_CODINGS: dict[str, Callable[[dict[str, Any]], list[dict[str, Any]]]] = {
    **{
        t: _concepts("code")
        for t in ("Condition", "DiagnosticReport", "Medication", "Observation", "Procedure", "ServiceRequest")
    },
    "AllergyIntolerance": _concepts("code", "reaction.substance"),
    "FamilyMemberHistory": _concepts("condition.code"),
    "MedicationRequest": _concepts("medicationCodeableConcept"),
    "MedicationDispense": _concepts("medicationCodeableConcept"),
    "Questionnaire": _top_level_item_codes,
}


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


@dataclass(frozen=True)
class Example:
    key: str  # folder/file, or folder/file:line for NDJSON
    text: bytes

    @property
    def resource(self) -> dict[str, Any]:
        loaded: dict[str, Any] = orjson.loads(self.text)
        return loaded

    @property
    def path(self) -> str:
        return f"{self.resource['resourceType']}/{self.resource['id']}"

    @property
    def conditional_references(self) -> list[tuple[str, str]]:
        """(FHIRPath, reference) of each ``Type?search`` reference, which R4 allows only in a transaction."""
        return _conditional_references(self.resource, self.resource["resourceType"])


def _conditional_references(node: Any, path: str) -> list[tuple[str, str]]:
    if isinstance(node, list):
        return [found for i, item in enumerate(node) for found in _conditional_references(item, f"{path}[{i}]")]
    if not isinstance(node, dict):
        return []
    found: list[tuple[str, str]] = []
    for key, value in node.items():
        if key == "reference" and isinstance(value, str) and _CONDITIONAL_REF.match(value):
            found.append((f"{path}.reference", value))
        else:
            found.extend(_conditional_references(value, f"{path}.{key}"))
    return found


_CONDITIONAL_REF = re.compile(r"^[A-Z][A-Za-z]+\?")


def _examples() -> list[Example]:
    found: list[Example] = []
    for folder in JSON_FOLDERS:
        for file in sorted((EXAMPLES / folder).glob("*.json")):
            found.append(Example(f"{folder}/{file.name}", file.read_bytes()))
    for file in sorted((EXAMPLES / SYNTHEA).glob("*.ndjson")):
        lines = [line for line in file.read_bytes().splitlines() if line.strip()]
        step = 1 if len(lines) <= SMALL_NDJSON else -(-len(lines) // SAMPLE)
        found.extend(Example(f"{SYNTHEA}/{file.name}:{n + 1}", lines[n]) for n in range(0, len(lines), step))
    return found


ALL = _examples()
VALID = [e for e in ALL if e.key not in INVALID]
# Synthea's bulk data names practitioners, locations and organisations by conditional reference
# (`Location?identifier=...`): stored through a transaction, which resolves them; a plain PUT is refused.
PLAIN = [e for e in VALID if not e.conditional_references]
CONDITIONAL = [e for e in VALID if e.conditional_references]


def _resolve(reference: str) -> str:
    """The literal reference that a conditional ``Type?identifier=system|value`` stands for in the corpus."""
    res_type, query = reference.split("?", 1)
    params = parse_qsl(query)
    assert [name for name, _ in params] == ["identifier"], reference
    system, value = params[0][1].split("|", 1)
    matches = [
        e.path
        for e in VALID
        if e.resource["resourceType"] == res_type
        and {"system": system, "value": value}
        in [{"system": i.get("system"), "value": i.get("value")} for i in e.resource.get("identifier", [])]
    ]
    assert len(matches) == 1, (reference, matches)
    return matches[0]


def _resolved_text(example: Example) -> bytes:
    """The example with its conditional references replaced by the literal references they resolve to."""
    text = example.text
    for _path, reference in example.conditional_references:
        text = text.replace(orjson.dumps(reference), orjson.dumps(_resolve(reference)))
    return text


def _patient_reference(resource: dict[str, Any]) -> str | None:
    element = PATIENT_ELEMENT.get(resource["resourceType"])
    value = resource.get(element) if element else None
    reference = value.get("reference") if isinstance(value, dict) else None
    return reference if isinstance(reference, str) and _PATIENT_REF.match(reference) else None


def _codes(resource: dict[str, Any]) -> list[str]:
    extract = CODE_CODINGS.get(resource["resourceType"])
    pairs = {(c.get("system"), c.get("code")) for c in (extract(resource) if extract else [])}
    return sorted(f"{system}|{code}" for system, code in pairs if system and code)


WITH_PATIENT = [e for e in VALID if _patient_reference(e.resource)]
WITH_CODE = [e for e in VALID if _codes(e.resource)]


def _ids(examples: list[Example]) -> list[str]:
    return [e.key for e in examples]


def _exact_text(body: bytes) -> Any:
    """JSON with each decimal kept as its text, so that 1.0 -> 1 or 0.10 -> 0.1 counts as a change."""
    return json.loads(body, parse_float=lambda text: ("decimal", text))


def _without_server_meta(resource: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    stripped = {k: v for k, v in resource.items() if k != "meta"}
    return {**stripped, "meta": meta} if meta else stripped


def _put(client: FlaskClient, example: Example, text: bytes | None = None) -> TestResponse:
    return client.put(f"/fhir/{example.path}", data=text or example.text, headers={"Content-Type": FHIR})


@dataclass
class Loaded:
    client: FlaskClient
    responses: dict[str, TestResponse]  # the plain PUT of each example, by key
    transaction: TestResponse  # the transaction that PUT each example of CONDITIONAL, in that order


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    """Every example PUT once into an empty database of each kind."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("examples") / "iop_fhir.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        url = f"sqlite:///{path}"
    else:
        url = request.getfixturevalue("postgres_schema_url")
        _empty_postgres(url)
    app = create_app(Settings(database_url=url, base_url=BASE))
    app.config["TESTING"] = True
    client = app.test_client()
    responses = {example.key: _put(client, example) for example in ALL}
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"{BASE}/{e.path}",
                "resource": e.resource,
                "request": {"method": "PUT", "url": e.path},
            }
            for e in CONDITIONAL
        ],
    }
    transaction = client.post("/fhir", data=orjson.dumps(bundle), headers={"Content-Type": FHIR})
    yield Loaded(client, responses, transaction)
    app.extensions["iop_fhir.store"].close()


def _search_ids(client: FlaskClient, query: str) -> list[str]:
    """The ids of every match of a search, following `next` links; duplicates are kept so that they show."""
    ids: list[str] = []
    url: str | None = f"/fhir/{query}&_count=100"
    while url:
        response = client.get(url)
        assert response.status_code == 200, (query, response.get_json())
        bundle = response.get_json()
        assert bundle["type"] == "searchset"
        entries = bundle.get("entry", [])
        assert [e["search"]["mode"] for e in entries] == ["match"] * len(entries)
        ids.extend(e["resource"]["id"] for e in entries)
        following = [link["url"] for link in bundle.get("link", []) if link["relation"] == "next"]
        url = following[0].removeprefix("http://testserver") if following else None
    return ids


def _read_back(client: FlaskClient, example: Example) -> Any:
    response = client.get(f"/fhir/{example.path}")
    assert response.status_code == 200
    stored = _exact_text(response.data)
    assert stored["meta"]["versionId"] == response.headers["ETag"].removeprefix('W/"').removesuffix('"')
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", stored["meta"]["lastUpdated"])
    return _without_server_meta(stored)


@pytest.mark.parametrize("example", PLAIN, ids=_ids(PLAIN))
def test_valid_example_is_created_at_its_id_and_read_back_unchanged(loaded: Loaded, example: Example) -> None:
    put = loaded.responses[example.key]
    assert put.status_code == 201, put.get_json()
    assert put.headers["Location"] == f"{BASE}/{example.path}/_history/1"
    assert _read_back(loaded.client, example) == _without_server_meta(_exact_text(example.text))


@pytest.mark.parametrize("example", CONDITIONAL, ids=_ids(CONDITIONAL))
def test_conditional_references_are_refused_outside_a_transaction_with_their_paths(
    loaded: Loaded, example: Example
) -> None:
    put = loaded.responses[example.key]
    assert put.status_code == 400
    outcome = put.get_json()
    assert {(i["severity"], i["code"]) for i in outcome["issue"]} == {("error", "value")}
    assert sorted(e for i in outcome["issue"] for e in i["expression"]) == sorted(
        path for path, _ in example.conditional_references
    )


@pytest.mark.parametrize("example", CONDITIONAL, ids=_ids(CONDITIONAL))
def test_transaction_stores_an_example_at_its_id_with_its_conditional_references_resolved(
    loaded: Loaded, example: Example
) -> None:
    assert loaded.transaction.status_code == 200, loaded.transaction.get_json()
    response = loaded.transaction.get_json()
    assert response["type"] == "transaction-response"
    entry = response["entry"][CONDITIONAL.index(example)]["response"]
    assert (entry["status"], entry["etag"]) == ("201 Created", 'W/"1"')
    assert entry["location"] == f"{example.path}/_history/1"
    assert _read_back(loaded.client, example) == _without_server_meta(_exact_text(_resolved_text(example)))


@pytest.mark.parametrize("example", WITH_PATIENT, ids=_ids(WITH_PATIENT))
def test_search_by_patient_finds_exactly_the_examples_of_that_patient(loaded: Loaded, example: Example) -> None:
    res_type, reference = example.resource["resourceType"], _patient_reference(example.resource)
    expected = sorted(
        e.resource["id"]
        for e in VALID
        if e.resource["resourceType"] == res_type and _patient_reference(e.resource) == reference
    )
    assert example.resource["id"] in expected
    assert sorted(_search_ids(loaded.client, f"{res_type}?patient={reference}")) == expected
    if PATIENT_ELEMENT[res_type] == "subject":
        assert sorted(_search_ids(loaded.client, f"{res_type}?subject={reference}")) == expected


@pytest.mark.parametrize("example", WITH_CODE, ids=_ids(WITH_CODE))
def test_search_by_code_finds_exactly_the_examples_with_that_coding(loaded: Loaded, example: Example) -> None:
    res_type = example.resource["resourceType"]
    for token in _codes(example.resource):
        expected = sorted(
            e.resource["id"] for e in VALID if e.resource["resourceType"] == res_type and token in _codes(e.resource)
        )
        query = f"{res_type}?code={quote(token, safe='')}"
        assert (token, sorted(_search_ids(loaded.client, query))) == (token, expected)


@pytest.mark.parametrize("example", VALID, ids=_ids(VALID))
def test_history_of_an_example_lists_every_version_newest_first(loaded: Loaded, example: Example) -> None:
    before = int(loaded.client.get(f"/fhir/{example.path}").headers["ETag"].removeprefix('W/"').removesuffix('"'))
    again = _put(loaded.client, example, _resolved_text(example))
    assert again.status_code == 200, again.get_json()
    assert again.headers["ETag"] == f'W/"{before + 1}"'
    response = loaded.client.get(f"/fhir/{example.path}/_history")
    assert response.status_code == 200
    history = response.get_json()
    assert (history["type"], history["total"]) == ("history", before + 1)
    entries = history["entry"]
    assert [e["resource"]["meta"]["versionId"] for e in entries] == [str(v) for v in range(before + 1, 0, -1)]
    assert [e["request"] for e in entries] == [{"method": "PUT", "url": example.path}] * (before + 1)
    assert [e["fullUrl"] for e in entries] == [f"{BASE}/{example.path}"] * (before + 1)
    original = _without_server_meta(_exact_text(_resolved_text(example)))
    for entry in _exact_text(response.data)["entry"]:
        assert _without_server_meta(entry["resource"]) == original


@pytest.mark.parametrize("key", sorted(INVALID))
def test_invalid_example_is_refused_with_400_and_the_path_of_its_error(loaded: Loaded, key: str) -> None:
    expression, _why = INVALID[key]
    example = next(e for e in ALL if e.key == key)
    response = loaded.responses[key]
    assert response.status_code == 400
    outcome = response.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    errors = [i for i in outcome["issue"] if i["severity"] in ("error", "fatal")]
    assert [i["expression"] for i in errors] == [[expression]], outcome
    assert loaded.client.get(f"/fhir/{example.path}").status_code == 404


@pytest.mark.peers
def test_the_invalid_list_is_exactly_what_the_independent_validator_refuses(tmp_path: Path) -> None:
    # The validator reads NDJSON files whole: the sampled lines are written out so it judges what was sent.
    sample = tmp_path / "synthea-sample.ndjson"
    sample.write_bytes(b"\n".join(e.text for e in ALL if e.key.startswith(SYNTHEA)) + b"\n")
    files = [str(EXAMPLES / folder) for folder in JSON_FOLDERS] + [str(sample)]
    run = subprocess.run([str(VALIDATOR), "--json", *files], capture_output=True, text=True, timeout=300)
    verdicts = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(verdicts) == len(ALL), run.stderr
    synthea = [e.key for e in ALL if e.key.startswith(SYNTHEA)]
    keys = {str(EXAMPLES / e.key): e.key for e in ALL} | {f"{sample}:{n}": k for n, k in enumerate(synthea, 1)}
    refused = {
        keys[v["path"]]: sorted(
            e for i in v["issues"] if i["severity"] in ("error", "fatal") for e in i.get("expression", [])
        )
        for v in verdicts
        if not v["ok"]
    }
    assert refused == {key: [expression] for key, (expression, _why) in INVALID.items()}
    assert run.returncode == 1
