"""What the server emits is valid FHIR R4 to an independent validator (../shared/tools/fhir-validate).

The CapabilityStatement (https://hl7.org/fhir/R4/capabilitystatement.html) and a sample of every kind of body the
server writes: created, updated and vread resources, searchset Bundles (with _include, paging, _summary), history
Bundles (with a deletion), OperationOutcomes of errors and of $validate, transaction- and batch-responses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import EXAMPLES
from flask.testing import FlaskClient

from iop_fhir.app import create_app
from iop_fhir.config import Settings

pytestmark = pytest.mark.peers

FHIR = "application/fhir+json"
VALIDATOR = EXAMPLES.parent / "tools" / "fhir-validate"
PHQ9_PANEL = EXAMPLES / "us-core" / "Observation-PHQ9-panel-example-44249-1.json"


def _validate(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(VALIDATOR), "--json", *args], input=stdin, capture_output=True, timeout=300)


def _post(client: FlaskClient, path: str, body: Any, status: int) -> bytes:
    response = client.post(f"/fhir/{path}", data=orjson.dumps(body), headers={"Content-Type": FHIR})
    assert response.status_code == status, response.get_json()
    return response.data


def _get(client: FlaskClient, path: str, status: int = 200) -> bytes:
    response = client.get(f"/fhir/{path}")
    assert response.status_code == status, response.get_json()
    return response.data


def _patient(family: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5", "value": f"MRN-{family}"}],
        "name": [{"family": family, "given": ["Alex"]}],
        "birthDate": "1990-04-01",
    }


def _emitted(client: FlaskClient) -> dict[str, bytes]:
    """One body of each kind the server writes, by a name that says what it is."""
    out: dict[str, bytes] = {"metadata": _get(client, "metadata")}
    out["created-patient"] = _post(client, "Patient", _patient("Rivera"), 201)
    patient_id = orjson.loads(out["created-patient"])["id"]
    panel = {**orjson.loads(PHQ9_PANEL.read_bytes()), "subject": {"reference": f"Patient/{patient_id}"}}
    out["created-observation"] = _post(client, "Observation", panel, 201)
    changed = {**orjson.loads(out["created-patient"]), "gender": "female"}
    updated = client.put(f"/fhir/Patient/{patient_id}", data=orjson.dumps(changed), headers={"Content-Type": FHIR})
    assert updated.status_code == 200
    out["updated-patient"] = updated.data
    out["vread-patient"] = _get(client, f"Patient/{patient_id}/_history/1")
    others = [orjson.loads(_post(client, "Patient", _patient(f"Page{n}"), 201))["id"] for n in range(3)]
    out["searchset-include"] = _get(client, f"Observation?patient=Patient/{patient_id}&_include=Observation:patient")
    out["searchset-page"] = _get(client, "Patient?_count=2&_sort=family")
    out["searchset-summary"] = _get(client, "Patient?_summary=true")
    out["searchset-count"] = _get(client, "Patient?_summary=count")
    doomed = orjson.loads(_post(client, "Patient", _patient("Doomed"), 201))["id"]
    assert client.delete(f"/fhir/Patient/{doomed}").status_code == 204
    out["history-instance"] = _get(client, f"Patient/{patient_id}/_history")
    out["history-type-with-deletion"] = _get(client, "Patient/_history")
    out["history-system"] = _get(client, "_history?_count=3")
    out["outcome-not-found"] = _get(client, "Patient/nobody", 404)
    out["outcome-gone"] = _get(client, f"Patient/{doomed}", 410)
    out["outcome-invalid"] = _post(client, "Patient", {**_patient("Bad"), "gender": "unknown-ish"}, 400)
    out["outcome-bad-search"] = _get(client, "Patient?no-such-param=1", 400)
    out["outcome-validate-ok"] = _post(client, "Patient/$validate", _patient("Fine"), 200)
    transaction = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:0b2d5a39-9c1b-4bde-9d6b-2f1f3b1e7c01",
                "resource": _patient("Txn"),
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": {**panel, "subject": {"reference": "urn:uuid:0b2d5a39-9c1b-4bde-9d6b-2f1f3b1e7c01"}},
                "request": {"method": "POST", "url": "Observation"},
            },
            {"resource": {**changed, "gender": "male"}, "request": {"method": "PUT", "url": f"Patient/{patient_id}"}},
            {"request": {"method": "GET", "url": f"Patient/{others[0]}"}},
        ],
    }
    out["transaction-response"] = _post(client, "", transaction, 200)
    read_after_write = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": {**changed, "gender": "other"}, "request": {"method": "PUT", "url": f"Patient/{patient_id}"}},
            {"request": {"method": "GET", "url": f"Patient/{patient_id}"}},
        ],
    }
    out["transaction-response-read-after-write"] = _post(client, "", read_after_write, 200)
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": _patient("Batch"), "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "GET", "url": "Patient/nobody"}},
            {"request": {"method": "DELETE", "url": f"Patient/{patient_id}"}},
        ],
    }
    out["batch-response"] = _post(client, "", batch, 200)
    return out


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """The validator's verdict on each emitted body, by name (one validator run for all of them)."""
    folder = tmp_path_factory.mktemp("emitted")
    shutil.copy(request.getfixturevalue("sqlite_template"), folder / "iop_fhir.db")
    app = create_app(Settings(database_url=f"sqlite:///{folder / 'iop_fhir.db'}", base_url="http://testserver/fhir"))
    app.config["TESTING"] = True
    try:
        emitted = _emitted(app.test_client())
    finally:
        app.extensions["iop_fhir.store"].close()
    for name, body in emitted.items():
        (folder / f"{name}.json").write_bytes(body)
    run = _validate(*(str(folder / f"{name}.json") for name in emitted))
    found = {Path(v["path"]).stem: v for v in map(json.loads, filter(None, run.stdout.splitlines()))}
    assert sorted(found) == sorted(emitted), run.stderr
    yield found


def test_capability_statement_from_stdin_passes_the_independent_validator(sqlite_client: FlaskClient) -> None:
    response = sqlite_client.get("/fhir/metadata")
    assert response.status_code == 200
    run = _validate("-", stdin=response.data)
    assert run.returncode == 0, run.stdout.decode()
    assert json.loads(run.stdout) == {
        "path": "<stdin>",
        "resourceType": "CapabilityStatement",
        "ok": True,
        "issues": [],
    }


NAMES = [
    "metadata",
    "created-patient",
    "created-observation",
    "updated-patient",
    "vread-patient",
    "searchset-include",
    "searchset-page",
    "searchset-summary",
    "searchset-count",
    "history-instance",
    "history-type-with-deletion",
    "history-system",
    "outcome-not-found",
    "outcome-gone",
    "outcome-invalid",
    "outcome-bad-search",
    "outcome-validate-ok",
    "transaction-response",
    "transaction-response-read-after-write",
    "batch-response",
]


# "transaction-response-read-after-write" updates a resource and reads it back in one transaction (reads are step 4
# of https://hl7.org/fhir/R4/http.html#trules): the response must not break bdl-7 (unique fullUrl + versionId).
@pytest.mark.parametrize("name", NAMES)
def test_emitted_body_passes_the_independent_validator(verdicts: dict[str, Any], name: str) -> None:
    verdict = verdicts[name]
    errors = [i for i in verdict["issues"] if i["severity"] in ("error", "fatal")]
    assert (verdict["ok"], errors) == (True, [])


def test_every_kind_of_emitted_body_is_checked(verdicts: dict[str, Any]) -> None:
    assert sorted(verdicts) == sorted(NAMES)
    expected = {
        "metadata": "CapabilityStatement",
        **dict.fromkeys(["created-patient", "updated-patient", "vread-patient"], "Patient"),
        "created-observation": "Observation",
        **{n: "Bundle" for n in NAMES if n.startswith(("searchset", "history", "transaction", "batch"))},
        **{n: "OperationOutcome" for n in NAMES if n.startswith("outcome")},
    }
    assert {name: v["resourceType"] for name, v in verdicts.items()} == expected
