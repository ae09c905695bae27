"""The project's conformance resources in the store: seeded from profiles/ and mappings/terminology/ when the app
starts, rewritten only when they change, and served at /fhir like any resource."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from iop_fhir import conformance
from iop_fhir.app import create_app
from iop_fhir.config import REPO, Settings
from iop_fhir.fhir.repository import Repository

C = "https://iop-fhir.org/fhir"
TREATMENT_PLAN = f"{C}/StructureDefinition/iop-treatment-plan"


def _code_system(version: str = "0.1.0", display: str = "Attended") -> dict[str, Any]:
    return {
        "resourceType": "CodeSystem",
        "id": "iop-test-attendance",
        "url": f"{C}/CodeSystem/iop-test-attendance",
        "version": version,
        "status": "active",
        "content": "complete",
        "concept": [{"code": "attended", "display": display}],
    }


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """A mappings folder with a terminology folder of two resources, and a profiles folder with one profile."""
    terminology = tmp_path / "mappings" / "terminology"
    terminology.mkdir(parents=True)
    (terminology / "CodeSystem-iop-test-attendance.json").write_text(json.dumps(_code_system()))
    value_set = {
        "resourceType": "ValueSet",
        "id": "iop-test-attendance",
        "url": f"{C}/ValueSet/iop-test-attendance",
        "status": "active",
        "compose": {"include": [{"system": f"{C}/CodeSystem/iop-test-attendance"}]},
    }
    (terminology / "ValueSet-iop-test-attendance.json").write_text(json.dumps(value_set))
    (terminology / "notes.txt").write_text("not a resource")
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    source = REPO / "profiles" / "StructureDefinition-iop-goal.json"
    (profiles / source.name).write_text(source.read_text())
    return tmp_path / "mappings", profiles


@contextmanager
def _app(settings: Settings) -> Iterator[Flask]:
    app = create_app(settings)
    app.config["TESTING"] = True
    try:
        yield app
    finally:
        app.extensions["iop_fhir.store"].close()


@pytest.fixture
def seeded_app(settings: Settings) -> Iterator[Flask]:
    """The app on the repository's own profiles and terminology, seeded at start."""
    with _app(replace(settings, seed_conformance=True)) as app:
        yield app


@pytest.fixture
def client(seeded_app: Flask) -> FlaskClient:
    return seeded_app.test_client()


@pytest.fixture
def folder_app(settings: Settings, folders: tuple[Path, Path]) -> Iterator[Flask]:
    mappings, profiles = folders
    with _app(replace(settings, mappings_dir=mappings, profiles_dir=profiles, seed_conformance=True)) as app:
        yield app


def test_profiles_are_searchable_by_url(client: FlaskClient) -> None:
    bundle = client.get(f"/fhir/StructureDefinition?url={TREATMENT_PLAN}").get_json()
    assert bundle["total"] == 1
    resource = bundle["entry"][0]["resource"]
    assert (resource["id"], resource["type"], resource["meta"]["versionId"]) == ("iop-treatment-plan", "CarePlan", "1")
    assert resource["snapshot"]["element"][0]["id"] == "CarePlan"


def test_extension_definitions_are_readable(client: FlaskClient) -> None:
    response = client.get("/fhir/StructureDefinition/session-attendance")
    assert response.status_code == 200
    assert response.get_json()["context"] == [{"type": "element", "expression": "Encounter"}]


def test_us_core_constraints_of_a_profile_are_checked_on_writes(client: FlaskClient) -> None:
    patient = {
        "resourceType": "Patient",
        "meta": {"profile": [f"{C}/StructureDefinition/iop-patient"]},
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5", "value": "MRN-1"}],
        "name": [{"text": "Alex Rivera"}],
        "gender": "female",
    }
    response = client.post("/fhir/Patient", json=patient, headers={"Content-Type": "application/fhir+json"})
    assert response.status_code == 400
    issue = response.get_json()["issue"][0]
    assert (issue["code"], issue["expression"]) == ("invariant", ["Patient.name[0]"])
    assert "us-core-6" in issue["diagnostics"]
    patient["name"] = [{"family": "Rivera", "given": ["Alex"]}]
    assert client.post("/fhir/Patient", json=patient).status_code == 201


def test_vendored_us_core_definitions_are_not_served_as_the_projects(client: FlaskClient) -> None:
    assert client.get("/fhir/StructureDefinition/us-core-patient").status_code == 404
    served = client.get("/fhir/StructureDefinition?url=http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient")
    assert served.get_json()["total"] == 0
    patient = client.get("/fhir/StructureDefinition/iop-patient").get_json()
    assert patient["baseDefinition"] == "http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"


def test_terminology_of_the_mappings_folder_is_served(folder_app: Flask) -> None:
    client = folder_app.test_client()
    code_system = client.get("/fhir/CodeSystem/iop-test-attendance").get_json()
    assert code_system["concept"] == [{"code": "attended", "display": "Attended"}]
    value_sets = client.get(f"/fhir/ValueSet?url={C}/ValueSet/iop-test-attendance").get_json()
    assert [e["resource"]["id"] for e in value_sets["entry"]] == ["iop-test-attendance"]
    profiles = client.get("/fhir/StructureDefinition").get_json()
    assert [e["resource"]["id"] for e in profiles["entry"]] == ["iop-goal"]


def test_profiles_of_the_profiles_folder_are_checked_on_writes(folder_app: Flask) -> None:
    client = folder_app.test_client()
    goal = {
        "resourceType": "Goal",
        "meta": {"profile": [f"{C}/StructureDefinition/iop-goal"]},
        "lifecycleStatus": "active",
        "description": {"text": "Attend every session"},
    }
    response = client.post("/fhir/Goal", json=goal, headers={"Content-Type": "application/fhir+json"})
    assert response.status_code == 400
    assert response.get_json()["issue"][0]["expression"] == ["Goal.subject"]


def test_a_second_start_rewrites_nothing(settings: Settings, folders: tuple[Path, Path]) -> None:
    mappings, profiles = folders
    folder_settings = replace(settings, mappings_dir=mappings, profiles_dir=profiles, seed_conformance=True)
    for _ in range(2):
        with _app(folder_settings) as app:
            repository: Repository = app.extensions["iop_fhir.repository"]
            assert repository.read("CodeSystem", "iop-test-attendance").version_id == 1


def test_no_seed_at_start_when_switched_off(settings: Settings, folders: tuple[Path, Path]) -> None:
    mappings, profiles = folders
    unseeded = replace(settings, mappings_dir=mappings, profiles_dir=profiles, seed_conformance=False)
    with _app(unseeded) as app:
        client = app.test_client()
        assert client.get("/fhir/_history").get_json()["total"] == 0
        goal = {"resourceType": "Goal", "meta": {"profile": [f"{C}/StructureDefinition/iop-goal"]}}
        response = client.post(
            "/fhir/Goal", json={**goal, "lifecycleStatus": "active", "subject": {"reference": "Group/g"}}
        )
        assert response.status_code == 400  # the profiles are still checked


def test_seed_writes_only_what_changed(seeded_app: Flask) -> None:
    repository: Repository = seeded_app.extensions["iop_fhir.repository"]
    assert conformance.seed(repository, [_code_system()]) == ["CodeSystem/iop-test-attendance"]
    assert conformance.seed(repository, [_code_system()]) == []
    assert conformance.seed(repository, [{**_code_system(), "meta": {"tag": [{"code": "x"}]}}]) == []
    assert conformance.seed(repository, [_code_system(display="Present")]) == ["CodeSystem/iop-test-attendance"]
    stored = repository.read("CodeSystem", "iop-test-attendance")
    assert stored.version_id == 2
    assert json.loads(stored.content or b"")["concept"][0]["display"] == "Present"


def test_seed_restores_a_deleted_resource(seeded_app: Flask) -> None:
    repository: Repository = seeded_app.extensions["iop_fhir.repository"]
    repository.delete("StructureDefinition", "iop-goal")
    resources = conformance.resources(REPO / "profiles", REPO / "mappings" / "terminology")
    assert conformance.seed(repository, resources) == ["StructureDefinition/iop-goal"]
    assert repository.read("StructureDefinition", "iop-goal").version_id == 3


def test_resources_reads_the_conformance_types_and_skips_missing_folders(
    tmp_path: Path, folders: tuple[Path, Path]
) -> None:
    mappings, profiles = folders
    found = conformance.resources(profiles, mappings / "terminology")
    assert [(r["resourceType"], r["id"]) for r in found] == [
        ("StructureDefinition", "iop-goal"),
        ("CodeSystem", "iop-test-attendance"),
        ("ValueSet", "iop-test-attendance"),
    ]
    assert conformance.resources(tmp_path / "none", tmp_path / "nothing") == []


def test_load_reads_the_folders_again_when_a_file_changes(folders: tuple[Path, Path]) -> None:
    mappings, profiles = folders
    first = conformance.load(profiles, mappings / "terminology")
    assert conformance.load(profiles, mappings / "terminology") is first
    path = mappings / "terminology" / "CodeSystem-iop-test-attendance.json"
    path.write_text(json.dumps(_code_system(version="0.2.0")))
    registry, resources = conformance.load(profiles, mappings / "terminology")
    assert registry is not first[0]
    assert [r.get("version") for r in resources if r["resourceType"] == "CodeSystem"] == ["0.2.0"]


def test_folders_default_to_the_repository_and_follow_the_environment(tmp_path: Path) -> None:
    defaults = Settings()
    assert (defaults.mappings_dir, defaults.profiles_dir) == (REPO / "mappings", REPO / "profiles")
    assert defaults.seed_conformance
    assert defaults.terminology_dir == REPO / "mappings" / "terminology"
    env = {
        "IOP_FHIR_MAPPINGS_DIR": str(tmp_path / "m"),
        "IOP_FHIR_PROFILES_DIR": str(tmp_path / "p"),
        "IOP_FHIR_SEED_CONFORMANCE": "false",
    }
    configured = Settings.from_env(env)
    assert (configured.mappings_dir, configured.profiles_dir) == (tmp_path / "m", tmp_path / "p")
    assert not configured.seed_conformance
    assert configured.terminology_dir == tmp_path / "m" / "terminology"
