"""Two independent FHIR client libraries, unmodified, against the real server over HTTP.

`fhirclient` (SMART on FHIR's Python client, R4 models) and `fhirpy` (beda.software) create, read, search, update
and page through results on a live server: werkzeug on a free port with the app on a temporary SQLite file, and
once through `iop-fhir serve` with two gunicorn workers.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from fhirclient import client as smart_client
from fhirclient.models import fhirdate, humanname, identifier, observation, patient
from fhirclient.server import FHIRServer
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import ResourceNotFound
from werkzeug.serving import make_server

from iop_fhir.app import create_app
from iop_fhir.config import Settings
from tests.auth import mint

MRN = "urn:oid:2.16.840.1.113883.19.5"
# Access tokens by FHIR base URL: each live server's, minted against its database.
TOKENS: dict[str, str] = {}
LOINC = "http://loinc.org"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[str]:
    """The FHIR base URL of a live server (werkzeug, threaded) on an empty SQLite file; links use its address."""
    db = tmp_path_factory.mktemp("live") / "iop_fhir.db"
    shutil.copy(request.getfixturevalue("sqlite_template"), db)
    app = create_app(Settings(database_url=f"sqlite:///{db}"))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/fhir"
    TOKENS[url] = mint(app, "system/*.cruds")
    yield url
    server.shutdown()
    thread.join()
    server.server_close()
    app.extensions["iop_fhir.store"].close()


def _family() -> str:
    """A family name no other test uses, so that searches on the shared server have exact answers."""
    return f"Fam{uuid.uuid4().hex[:12]}"


# -- fhirclient ----------------------------------------------------------------------------------------------------


def _smart(base: str) -> FHIRServer:
    smart = smart_client.FHIRClient(settings={"app_id": "iop-fhir-tests", "api_base": base})
    server: FHIRServer = smart.server
    server.session.headers["Authorization"] = f"Bearer {TOKENS[base]}"
    return server


def _smart_patient(family: str, birth_date: str = "1990-04-01", mrn: str | None = None) -> patient.Patient:
    name = humanname.HumanName()
    name.family = family
    name.given = ["Alex"]
    ident = identifier.Identifier()
    ident.system = MRN
    ident.value = mrn or f"MRN-{uuid.uuid4().hex[:8]}"
    p = patient.Patient()
    p.name = [name]
    p.identifier = [ident]
    p.gender = "female"
    p.birthDate = fhirdate.FHIRDate(birth_date)
    return p


def test_fhirclient_create_returns_the_stored_patient_and_read_gets_it_back(base: str) -> None:
    server = _smart(base)
    family = _family()
    created: dict[str, Any] = _smart_patient(family, mrn="MRN-fc-1").create(server)
    assert created["meta"]["versionId"] == "1"
    assert (created["name"], created["gender"], created["birthDate"]) == (
        [{"family": family, "given": ["Alex"]}],
        "female",
        "1990-04-01",
    )
    assert created["identifier"] == [{"system": MRN, "value": "MRN-fc-1"}]
    read = patient.Patient.read(created["id"], server)
    assert read.as_json() == created
    assert read.birthDate is not None and read.birthDate.isostring == "1990-04-01"


def test_fhirclient_search_by_family_and_identifier_finds_exactly_the_matches(base: str) -> None:
    server = _smart(base)
    family = _family()
    ids = [_smart_patient(family, mrn=f"MRN-{family}-{n}").create(server)["id"] for n in range(3)]
    _smart_patient(_family()).create(server)
    found = patient.Patient.where({"family": family}).perform_resources_iter(server)
    assert sorted(p.id for p in found) == sorted(ids)
    by_token = patient.Patient.where({"identifier": f"{MRN}|MRN-{family}-1"}).perform_resources_iter(server)
    assert [p.id for p in by_token] == [ids[1]]
    assert list(patient.Patient.where({"family": _family()}).perform_resources_iter(server)) == []


def test_fhirclient_deprecated_perform_resources_gives_the_same_matches(base: str) -> None:
    server = _smart(base)
    family = _family()
    ids = [_smart_patient(family).create(server)["id"] for _ in range(2)]
    with pytest.deprecated_call():
        found = patient.Patient.where({"family": family}).perform_resources(server)
    assert sorted(p.id for p in found) == sorted(ids)


def test_fhirclient_update_stores_a_new_version(base: str) -> None:
    server = _smart(base)
    created = _smart_patient(_family()).create(server)
    read = patient.Patient.read(created["id"], server)
    read.gender = "male"
    updated = read.update()
    assert (updated["id"], updated["meta"]["versionId"], updated["gender"]) == (created["id"], "2", "male")
    again = patient.Patient.read(created["id"], server)
    assert (again.gender, again.meta.versionId) == ("male", "2")
    first = patient.Patient.read_from(f"Patient/{created['id']}/_history/1", server)
    assert (first.gender, first.meta.versionId) == ("female", "1")


def test_fhirclient_pages_through_every_match_in_sorted_order(base: str) -> None:
    server = _smart(base)
    family = _family()
    births = [f"19{50 + n:02d}-01-01" for n in range(25)]
    ids = {birth: _smart_patient(family, birth).create(server)["id"] for birth in reversed(births)}
    search = patient.Patient.where({"family": family, "_count": "10", "_sort": "birthdate", "_total": "accurate"})
    pages = list(search.perform_iter(server))
    assert [len(page.entry or []) for page in pages] == [10, 10, 5]
    assert [e.resource.id for page in pages for e in page.entry or []] == [ids[b] for b in births]
    assert [page.total for page in pages] == [25, 25, 25]


def test_fhirclient_observation_is_found_by_its_patient_and_code(base: str) -> None:
    server = _smart(base)
    subject = _smart_patient(_family()).create(server)
    obs = observation.Observation(
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "44261-6", "display": "PHQ-9 total score"}]},
            "subject": {"reference": f"Patient/{subject['id']}"},
            "valueQuantity": {"value": 14, "unit": "{score}", "system": "http://unitsofmeasure.org", "code": "{score}"},
        }
    )
    created = obs.create(server)
    query = {"patient": f"Patient/{subject['id']}", "code": f"{LOINC}|44261-6"}
    found = list(observation.Observation.where(query).perform_resources_iter(server))
    assert [o.id for o in found] == [created["id"]]
    assert found[0].valueQuantity.value == 14


# -- fhirpy --------------------------------------------------------------------------------------------------------


def test_fhirpy_save_creates_and_the_reference_reads_it_back(base: str) -> None:
    fhir = SyncFHIRClient(base, authorization=f"Bearer {TOKENS[base]}")
    family = _family()
    pat = fhir.resource("Patient", name=[{"family": family, "given": ["Sam"]}], gender="other", birthDate="1985-02-03")
    pat.save()
    assert pat.id is not None
    assert pat["meta"]["versionId"] == "1"
    fetched = fhir.reference("Patient", pat.id).to_resource()
    assert fetched.serialize() == pat.serialize()
    assert fhir.resources("Patient").search(_id=pat.id).get().serialize() == pat.serialize()
    with pytest.raises(ResourceNotFound):
        fhir.reference("Patient", f"no-{uuid.uuid4().hex}").to_resource()


def test_fhirpy_search_finds_exactly_the_matches(base: str) -> None:
    fhir = SyncFHIRClient(base, authorization=f"Bearer {TOKENS[base]}")
    family = _family()
    births = ["1970-05-01", "1980-05-01", "1990-05-01"]
    pats = [fhir.resource("Patient", name=[{"family": family}], birthDate=b) for b in births]
    for n, pat in enumerate(pats):
        pat["identifier"] = [{"system": MRN, "value": f"MRN-{family}-{n}"}]
        pat.save()
    ids = [p.id for p in pats]
    fhir.resource("Patient", name=[{"family": _family()}], birthDate="1980-05-01").save()
    patients = fhir.resources("Patient")
    assert sorted(p.id for p in patients.search(family=family).fetch_all()) == sorted(ids)
    assert [p.id for p in patients.search(identifier=f"{MRN}|MRN-{family}-2").fetch()] == [ids[2]]
    after = patients.search(family=family, birthdate__ge="1980-05-01").fetch_all()
    assert sorted(p.id for p in after) == sorted(ids[1:])
    before = patients.search(family=family, birthdate__lt="1980").fetch_all()
    assert [p.id for p in before] == [ids[0]]


def test_fhirpy_update_saves_a_new_version(base: str) -> None:
    fhir = SyncFHIRClient(base, authorization=f"Bearer {TOKENS[base]}")
    pat = fhir.resource("Patient", name=[{"family": _family()}], gender="female")
    pat.save()
    pat["gender"] = "male"
    pat.save()
    assert (pat["meta"]["versionId"], pat["gender"]) == ("2", "male")
    fetched = fhir.reference("Patient", pat.id).to_resource()
    assert (fetched["meta"]["versionId"], fetched["gender"]) == ("2", "male")


def test_fhirpy_limit_fetches_one_page_and_fetch_all_follows_next_links(base: str) -> None:
    fhir = SyncFHIRClient(base, authorization=f"Bearer {TOKENS[base]}")
    family = _family()
    births = [f"19{60 + n:02d}-07-15" for n in range(25)]
    ids = {}
    for birth in reversed(births):
        pat = fhir.resource("Patient", name=[{"family": family}], birthDate=birth)
        pat.save()
        ids[birth] = pat.id
    search = fhir.resources("Patient").search(family=family)
    assert len(search.limit(10).fetch()) == 10
    every = search.limit(10).fetch_all()
    assert sorted(p.id for p in every) == sorted(ids.values())
    ordered = search.sort("-birthdate").limit(7).fetch_all()
    assert [p.id for p in ordered] == [ids[b] for b in reversed(births)]
    assert [p.id for p in search.sort("birthdate").limit(3).fetch()] == [ids[b] for b in births[:3]]


def test_fhirpy_observation_is_found_by_patient_and_code_with_the_patient_included(base: str) -> None:
    fhir = SyncFHIRClient(base, authorization=f"Bearer {TOKENS[base]}")
    pat = fhir.resource("Patient", name=[{"family": _family()}])
    pat.save()
    obs = fhir.resource(
        "Observation",
        status="final",
        code={"coding": [{"system": LOINC, "code": "72109-2", "display": "AUDIT-C"}]},
        subject=pat.to_reference(),
        valueInteger=5,
    )
    obs.save()
    other = fhir.resource("Observation", status="final", code={"coding": [{"system": LOINC, "code": "1-8"}]})
    other["subject"] = pat.to_reference()
    other.save()
    found = fhir.resources("Observation").search(patient=pat, code=f"{LOINC}|72109-2").fetch_all()
    assert [o.id for o in found] == [obs.id]
    raw = fhir.resources("Observation").search(patient=pat.id).include("Observation", "patient").fetch_raw()
    modes = sorted((e["search"]["mode"], e["resource"]["resourceType"], e["resource"]["id"]) for e in raw["entry"])
    assert modes == sorted(
        [("include", "Patient", pat.id), ("match", "Observation", obs.id), ("match", "Observation", other.id)]
    )


# -- iop-fhir serve (gunicorn, 2 workers) ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _serve_command() -> list[str]:
    script = Path(sys.executable).with_name("iop-fhir")
    return [str(script)] if script.exists() else [sys.executable, "-m", "iop_fhir.cli"]


def _children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


def test_iop_fhir_serve_with_two_workers_serves_fhirpy_and_logs_no_search_values(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "IOP_FHIR_DATABASE_URL": f"sqlite:///{tmp_path / 'served.db'}"}
    log = (tmp_path / "serve.log").open("wb")
    command = [*_serve_command(), "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2", "--access-log"]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if (
                    requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
                    and len(_children(process.pid)) == 2
                ):
                    break
            except requests.RequestException:  # not listening yet, or a slow first answer on a loaded machine
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        served = create_app(Settings(database_url=env["IOP_FHIR_DATABASE_URL"], seed_conformance=False))
        token = mint(served, "system/*.cruds")
        served.extensions["iop_fhir.store"].close()
        fhir = SyncFHIRClient(f"http://127.0.0.1:{port}/fhir", authorization=f"Bearer {token}")
        family = _family()
        pats = [fhir.resource("Patient", name=[{"family": family}], birthDate=f"20{n:02d}-01-01") for n in range(20)]
        for pat in pats:
            pat.save()
        ids = [p.id for p in pats]
        assert len(set(ids)) == 20
        found = fhir.resources("Patient").search(family=family).sort("birthdate").limit(6).fetch_all()
        assert [p.id for p in found] == ids
        for pat in pats:
            assert fhir.reference("Patient", pat.id).to_resource().serialize() == pat.serialize()
        metadata = requests.get(f"http://127.0.0.1:{port}/fhir/metadata", timeout=10)
        assert (metadata.status_code, metadata.json()["fhirVersion"]) == (200, "4.0.1")
    finally:
        process.terminate()
        returncode = process.wait(timeout=30)
        log.close()
    served_log = (tmp_path / "serve.log").read_text()
    assert returncode == 0, served_log
    # The access log names each request, but never the search values (here a family name) of its query string.
    assert '"GET /fhir/Patient" 200' in served_log
    assert family not in served_log
