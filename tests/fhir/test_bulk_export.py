"""Bulk Data $export (https://hl7.org/fhir/uv/bulkdata/export.html) on SQLite and PostgreSQL: the async kick-off,
status and manifest (X-Progress a percentage first), a POST kick-off with or without a Parameters body, NDJSON that
holds exactly what search returns, _type, _since, _elements, the Patient compartment at Patient and Group level and of
the patients `patient` names, refused parameters (never ignored when ignoring them would export more), jobs owned
by their client, cancelling, jobs resumed by the worker after their process died, and 42 CFR Part 2: a partner's
export holds only consented patients, carries the redisclosure mark and is accounted for per patient; AuditEvents
are never exported to a non-administrator.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from iop_fhir import cli, runtime
from iop_fhir.app import create_app
from iop_fhir.config import Settings
from iop_fhir.fhir.export import Exporter, ExportRequest, progress
from iop_fhir.privacy.disclosure import REDISCLOSURE_NOTICE
from iop_fhir.privacy.trail import patients_of
from iop_fhir.r4.validation import validate
from iop_fhir.security.access import Access, Principal
from iop_fhir.security.scopes import Scopes
from iop_fhir.store import schema
from iop_fhir.store.exports import ExportJob
from tests.auth import TokenClient, admin_token, mint
from tests.conftest import TOOLS

CONTRACT = Path(__file__).resolve().parents[3] / "shared" / "contract"
PARTNER = "passaic-valley-recovery"
FHIR = "application/fhir+json"
ASYNC = {"Prefer": "respond-async"}
BASE = "http://testserver"


# -- helpers --------------------------------------------------------------------------------------------------


def as_client(app: Flask, token: str) -> FlaskClient:
    found = app.test_client()
    assert isinstance(found, TokenClient)
    found.token = token
    return found


def exports(app: Flask) -> Exporter:
    found: Exporter = app.extensions["iop_fhir.exports"]
    return found


@pytest.fixture
def small_files(settings: Settings) -> Iterator[Flask]:
    """An app whose export files hold at most 2 resources (so 2 per chunk) and whose jobs' leases expire at once,
    its background thread off."""
    small = create_app(replace(settings, export_file_lines=2, worker_lease_seconds=0))
    small.config["TESTING"] = True
    exports(small).background = False
    yield small
    small.extensions["iop_fhir.store"].close()


def after_one_chunk() -> Callable[[], bool]:
    """A ``stop`` for Exporter.run that lets one chunk be stored, then stops the run."""
    asked = iter([False])
    return lambda: next(asked, True)


@pytest.fixture
def queued(app: Flask) -> Exporter:
    """The app's exporter with its background thread off: kicked-off jobs wait for run_due or the worker."""
    exporter = exports(app)
    exporter.background = False
    return exporter


def post(client: FlaskClient, res_type: str, body: dict[str, Any]) -> str:
    response = client.post(
        f"/fhir/{res_type}", data=orjson.dumps({"resourceType": res_type, **body}), content_type=FHIR
    )
    assert response.status_code == 201, response.get_json()
    res_id: str = response.get_json()["id"]
    return res_id


def observation(patient: str, **extra: Any) -> dict[str, Any]:
    return {"status": "final", "code": {"text": "craving"}, "subject": {"reference": f"Patient/{patient}"}, **extra}


def kick_off(client: FlaskClient, path: str = "/fhir/$export", **headers: str) -> str:
    """The status URL path of a kicked-off job."""
    response = client.get(path, headers={**ASYNC, **headers})
    assert response.status_code == 202, response.get_json()
    location: str = response.headers["Content-Location"]
    assert location.startswith(f"{BASE}/fhir/$export-status/")
    return location.removeprefix(BASE)


def finished(app: Flask, client: FlaskClient, status: str) -> dict[str, Any]:
    """The manifest, once the job has run (background thread, or run here if it is off)."""
    exporter = exports(app)
    if exporter.background:
        exporter.wait(60)
    else:
        exporter.run_due()
    response = client.get(status)
    assert response.status_code == 200, (response.status_code, response.data)
    assert response.mimetype == "application/json"
    manifest: dict[str, Any] = response.get_json()
    return manifest


def lines(client: FlaskClient, url: str) -> list[dict[str, Any]]:
    response = client.get(url.removeprefix(BASE))
    assert response.status_code == 200
    assert response.mimetype == "application/fhir+ndjson"
    assert response.is_streamed
    assert response.data.endswith(b"\n")
    return [orjson.loads(line) for line in response.data.splitlines()]


def exported(client: FlaskClient, manifest: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every exported resource by type, checking each file's count."""
    found: dict[str, list[dict[str, Any]]] = {}
    for item in manifest["output"]:
        resources = lines(client, item["url"])
        assert len(resources) == item["count"]
        assert {r["resourceType"] for r in resources} == {item["type"]}
        found.setdefault(item["type"], []).extend(resources)
    return found


def export_all(app: Flask, client: FlaskClient, path: str = "/fhir/$export") -> dict[str, list[dict[str, Any]]]:
    return exported(client, finished(app, client, kick_off(client, path)))


def searched(client: FlaskClient, res_type: str) -> list[dict[str, Any]]:
    response = client.get(f"/fhir/{res_type}?_count=1000")
    assert response.status_code == 200, response.get_json()
    return [e["resource"] for e in response.get_json().get("entry", [])]


def issue(response: Any) -> dict[str, Any]:
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome", body
    first: dict[str, Any] = body["issue"][0]
    return first


def ids(resources: list[dict[str, Any]]) -> set[str]:
    return {f"{r['resourceType']}/{r['id']}" for r in resources}


def job_rows(app: Flask) -> tuple[int, int]:
    with app.extensions["iop_fhir.store"].engine.connect() as conn:
        jobs = conn.execute(select(func.count()).select_from(schema.export_jobs)).scalar_one()
        files = conn.execute(select(func.count()).select_from(schema.export_files)).scalar_one()
    return jobs, files


@pytest.fixture
def records(client: FlaskClient) -> dict[str, Any]:
    """Two patients with Observations, one Observation that names patient one only as its focus (no compartment
    parameter of Observation), an Organization, and a Group of patient one."""
    one = post(client, "Patient", {"name": [{"family": "One"}]})
    two = post(client, "Patient", {"name": [{"family": "Two"}]})
    of_one = [post(client, "Observation", observation(one)) for _ in range(3)]
    of_two = [post(client, "Observation", observation(two))]
    focus = post(
        client, "Observation", {"status": "final", "code": {"text": "x"}, "focus": [{"reference": f"Patient/{one}"}]}
    )
    organization = post(client, "Organization", {"name": "Clinic"})
    group = post(
        client,
        "Group",
        {
            "type": "person",
            "actual": True,
            "member": [
                {"entity": {"reference": f"Patient/{one}"}},
                {"entity": {"reference": f"Patient/{two}"}, "inactive": True},
            ],
        },
    )
    return {
        "one": one,
        "two": two,
        "of_one": of_one,
        "of_two": of_two,
        "focus": focus,
        "organization": organization,
        "group": group,
    }


# -- the async pattern ---------------------------------------------------------------------------------------


def test_kick_off_answers_202_with_the_status_url_in_content_location(client: FlaskClient, queued: Exporter) -> None:
    response = client.get("/fhir/$export", headers={**ASYNC, "Accept": FHIR})
    assert response.status_code == 202
    assert response.headers["Content-Location"].startswith(f"{BASE}/fhir/$export-status/")
    assert issue(response)["severity"] == "information"


def test_status_is_202_with_progress_while_the_job_waits_then_200_with_the_manifest(
    app: Flask, client: FlaskClient, queued: Exporter, records: dict[str, Any]
) -> None:
    status = kick_off(client, "/fhir/$export?_type=Patient,Observation")
    waiting = client.get(status)
    assert waiting.status_code == 202
    assert waiting.headers["X-Progress"] == "0% (queued)"
    assert int(waiting.headers["Retry-After"]) > 0
    assert waiting.data == b"" and "Content-Type" not in waiting.headers  # no body, no media type
    manifest = finished(app, client, status)
    assert manifest["request"] == f"{BASE}/fhir/$export?_type=Patient,Observation"
    assert manifest["requiresAccessToken"] is True
    assert manifest["transactionTime"].endswith("Z")
    assert [(o["type"], o["count"]) for o in manifest["output"]] == [("Observation", 5), ("Patient", 2)]
    assert manifest["error"] == []
    assert all(o["url"].startswith(f"{BASE}/fhir/$export-file/") for o in manifest["output"])


def test_the_server_runs_the_job_in_a_background_thread_without_a_worker(
    app: Flask, client: FlaskClient, records: dict[str, Any]
) -> None:
    assert exports(app).background
    status = kick_off(client, "/fhir/$export?_type=Patient")
    exports(app).wait(60)
    assert client.get(status).status_code == 200


def test_post_kick_off_takes_its_parameters_in_a_parameters_resource(
    app: Flask, client: FlaskClient, queued: Exporter, records: dict[str, Any]
) -> None:
    parameters = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "_type", "valueString": "Organization"},
            {"name": "_outputFormat", "valueString": "application/fhir+ndjson"},
        ],
    }
    response = client.post("/fhir/$export", data=orjson.dumps(parameters), content_type=FHIR, headers=ASYNC)
    assert response.status_code == 202, response.get_json()
    manifest = finished(app, client, response.headers["Content-Location"].removeprefix(BASE))
    assert [o["type"] for o in manifest["output"]] == ["Organization"]


# -- what the files hold -------------------------------------------------------------------------------------


def test_ndjson_holds_exactly_what_search_returns_one_resource_per_line(
    app: Flask, client: FlaskClient, queued: Exporter, records: dict[str, Any]
) -> None:
    found = export_all(app, client)
    assert "AuditEvent" not in found  # the program's client is no administrator
    for res_type, resources in found.items():
        by_id = {r["id"]: r for r in searched(client, res_type)}
        assert {r["id"]: r for r in resources} == by_id
    assert {"Patient", "Observation", "Organization", "Group"} <= set(found)
    assert len(found["Observation"]) == 5


def test_files_are_split_past_the_configured_number_of_lines(small_files: Flask, records: Any) -> None:
    client = small_files.test_client()
    manifest = finished(small_files, client, kick_off(client, "/fhir/$export?_type=Observation"))
    assert [o["count"] for o in manifest["output"]] == [2, 2, 1]
    assert len(sum((lines(client, o["url"]) for o in manifest["output"]), [])) == 5


def test_type_limits_the_export_to_the_types_named(
    app: Flask, client: FlaskClient, queued: Exporter, records: dict[str, Any]
) -> None:
    found = export_all(app, client, "/fhir/$export?_type=Organization&_type=Group")
    assert {t: len(r) for t, r in found.items()} == {"Group": 1, "Organization": 1}


def test_since_exports_only_what_changed_after_it(
    app: Flask, client: FlaskClient, queued: Exporter, records: dict[str, Any]
) -> None:
    first = finished(app, client, kick_off(client, "/fhir/$export?_type=Patient,Observation"))
    later = post(client, "Observation", observation(records["two"]))
    since = first["transactionTime"].replace("+", "%2B")
    found = export_all(app, client, f"/fhir/$export?_type=Patient,Observation&_since={since}")
    assert {t: ids(r) for t, r in found.items()} == {"Observation": {f"Observation/{later}"}}


def test_patient_export_holds_the_patient_compartment_by_its_parameters_not_any_reference(
    app: Flask, client: FlaskClient, queued: Exporter, records: dict[str, Any]
) -> None:
    found = export_all(app, client, "/fhir/Patient/$export")
    assert ids(found["Patient"]) == {f"Patient/{records['one']}", f"Patient/{records['two']}"}
    expected = {f"Observation/{o}" for o in records["of_one"] + records["of_two"]}
    assert ids(found["Observation"]) == expected  # not the one with the patient as focus only
    assert "Organization" not in found
    assert ids(found["Group"]) == {f"Group/{records['group']}"}  # a Group is in its members' compartments


def test_group_export_holds_the_compartments_of_its_active_members_only(
    app: Flask, client: FlaskClient, queued: Exporter, records: dict[str, Any]
) -> None:
    found = export_all(app, client, f"/fhir/Group/{records['group']}/$export")
    assert ids(found["Patient"]) == {f"Patient/{records['one']}"}
    assert ids(found["Observation"]) == {f"Observation/{o}" for o in records["of_one"]}


def test_group_export_of_an_unknown_group_is_404(client: FlaskClient) -> None:
    response = client.get("/fhir/Group/nobody/$export", headers=ASYNC)
    assert response.status_code == 404
    assert issue(response)["code"] == "not-found"


def test_every_exported_resource_passes_the_validator(
    app: Flask, client: FlaskClient, queued: Exporter, records: dict[str, Any]
) -> None:
    for resources in export_all(app, client).values():
        for resource in resources:
            assert [i for i in validate(resource) if i.severity in ("error", "fatal")] == []


@pytest.mark.peers
def test_exported_ndjson_passes_the_independent_validator(
    sqlite_app: Flask, sqlite_client: FlaskClient, tmp_path: Path
) -> None:
    client = sqlite_client
    one = post(client, "Patient", {"name": [{"family": "One"}], "birthDate": "1990-01-01"})
    post(client, "Observation", observation(one))
    exports(sqlite_app).background = False
    manifest = finished(sqlite_app, client, kick_off(client))
    for item in manifest["output"]:
        (tmp_path / f"{item['type']}.ndjson").write_bytes(client.get(item["url"].removeprefix(BASE)).data)
    checked = subprocess.run([str(TOOLS / "fhir-validate"), str(tmp_path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("OK ") == 2


def test_a_type_that_fails_is_reported_in_the_error_file_and_the_others_are_exported(
    app: Flask, client: FlaskClient, queued: Exporter, records: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    page = queued.jobs.page

    def failing(res_type: str, *args: Any, **kwargs: Any) -> Any:
        if res_type == "Organization":
            raise RuntimeError("unreadable")
        return page(res_type, *args, **kwargs)

    monkeypatch.setattr(queued.jobs, "page", failing)
    manifest = finished(app, client, kick_off(client, "/fhir/$export?_type=Organization,Patient"))
    assert [o["type"] for o in manifest["output"]] == ["Patient"]
    [error] = manifest["error"]
    [outcome] = lines(client, error["url"])
    assert outcome["issue"][0]["code"] == "exception"
    assert "Organization" in outcome["issue"][0]["diagnostics"]


def test_a_job_that_cannot_be_done_answers_500_with_an_exception_outcome(
    app: Flask, client: FlaskClient, queued: Exporter, records: dict[str, Any]
) -> None:
    status = kick_off(client, f"/fhir/Group/{records['group']}/$export")
    assert client.delete(f"/fhir/Group/{records['group']}").status_code == 204
    queued.run_due()
    response = client.get(status)
    assert response.status_code == 500
    assert issue(response)["code"] == "exception"
    assert records["group"] in issue(response)["diagnostics"]


def test_polling_starts_a_job_that_waits_so_it_needs_no_worker(
    app: Flask, client: FlaskClient, queued: Exporter, records: dict[str, Any]
) -> None:
    status = kick_off(client, "/fhir/$export?_type=Patient")
    queued.background = True
    assert client.get(status).status_code == 202
    queued.wait(60)
    assert client.get(status).status_code == 200


# -- refused kick-offs ---------------------------------------------------------------------------------------


def test_kick_off_without_prefer_respond_async_is_400_naming_prefer(client: FlaskClient) -> None:
    response = client.get("/fhir/$export")
    assert response.status_code == 400
    assert issue(response)["expression"] == ["Prefer"]


@pytest.mark.parametrize(
    ("query", "expression", "code"),
    [
        ("_type=Foo", "_type", "invalid"),
        ("_type=Patient,Nonsense", "_type", "invalid"),
        ("_since=yesterday", "_since", "invalid"),
        ("_since=2026-01-01", "_since", "invalid"),
        ("_since=2026-13-01T00:00:00Z", "_since", "invalid"),
        ("_outputFormat=text/csv", "_outputFormat", "not-supported"),
        ("_typeFilter=Observation%3Fstatus%3Dfinal", "_typeFilter", "not-supported"),
        ("patient=Patient/x", "patient", "not-supported"),
        ("includeAssociatedData=LatestProvenanceResources", "includeAssociatedData", "not-supported"),
        ("_elements=Nonsense.id", "_elements", "invalid"),
        ("_elements=Patient.name.family", "_elements", "invalid"),
        ("_count=10", "_count", "not-supported"),
    ],
)
def test_bad_kick_off_parameters_are_400_naming_the_parameter(
    sqlite_client: FlaskClient, query: str, expression: str, code: str
) -> None:
    response = sqlite_client.get(f"/fhir/$export?{query}", headers=ASYNC)
    assert response.status_code == 400
    assert (issue(response)["code"], issue(response)["expression"]) == (code, [expression])
    if expression == "_type":
        assert query.split(",")[-1].split("=")[-1] in issue(response)["diagnostics"]


@pytest.mark.parametrize("query", ["_outputFormat=application/fhir+ndjson", "_since=2026-01-01T00:00:00+05:00"])
def test_a_plus_sign_left_unencoded_in_output_format_or_since_is_understood(
    sqlite_client: FlaskClient, sqlite_app: Flask, query: str
) -> None:
    exports(sqlite_app).background = False
    assert sqlite_client.get(f"/fhir/$export?{query}", headers=ASYNC).status_code == 202


def test_patient_export_refuses_a_type_outside_the_patient_compartment(sqlite_client: FlaskClient) -> None:
    response = sqlite_client.get("/fhir/Patient/$export?_type=Organization", headers=ASYNC)
    assert response.status_code == 400
    assert issue(response)["code"] == "not-supported"
    assert "Organization" in issue(response)["diagnostics"]


def test_with_handling_lenient_unsupported_parameters_are_ignored_and_said_so_in_the_error_file(
    app: Flask, client: FlaskClient, queued: Exporter, records: dict[str, Any]
) -> None:
    status = kick_off(
        client,
        "/fhir/$export?_type=Organization&includeAssociatedData=LatestProvenanceResources",
        Prefer="respond-async, handling=lenient",
    )
    manifest = finished(app, client, status)
    assert [o["type"] for o in manifest["output"]] == ["Organization"]
    [error] = manifest["error"]
    assert error["type"] == "OperationOutcome"
    [outcome] = lines(client, error["url"])
    assert outcome["issue"][0]["severity"] == "information"
    assert "includeAssociatedData" in outcome["issue"][0]["diagnostics"]
    assert [i for i in validate(outcome) if i.severity in ("error", "fatal")] == []


def test_a_type_the_token_may_not_read_is_refused_with_403(app: Flask) -> None:
    reader = as_client(app, mint(app, "system/Patient.rs"))
    response = reader.get("/fhir/$export?_type=Patient,Observation", headers=ASYNC)
    assert response.status_code == 403
    assert "system/Observation.rs" in issue(response)["diagnostics"]


def test_without_type_only_the_types_the_token_may_read_are_exported(
    app: Flask, queued: Exporter, records: dict[str, Any]
) -> None:
    reader = as_client(app, mint(app, "system/Patient.rs system/Observation.r"))
    assert set(export_all(app, reader)) == {"Patient"}


# -- jobs belong to their client -----------------------------------------------------------------------------


def test_another_client_gets_404_for_the_status_the_files_and_delete(
    app: Flask, client: FlaskClient, queued: Exporter, records: dict[str, Any]
) -> None:
    status = kick_off(client, "/fhir/$export?_type=Patient")
    manifest = finished(app, client, status)
    other = as_client(app, mint(app, "system/*.rs"))
    assert other.get(status).status_code == 404
    assert other.get(manifest["output"][0]["url"].removeprefix(BASE)).status_code == 404
    assert other.delete(status).status_code == 404
    assert client.get(status).status_code == 200
    assert client.get(status.replace("-status/", "-status/0")).status_code == 404


def test_delete_cancels_the_job_and_removes_its_files(
    app: Flask, client: FlaskClient, queued: Exporter, records: dict[str, Any]
) -> None:
    status = kick_off(client, "/fhir/$export?_type=Patient")
    manifest = finished(app, client, status)
    response = client.delete(status)
    assert response.status_code == 202
    assert client.get(status).status_code == 404
    assert client.get(manifest["output"][0]["url"].removeprefix(BASE)).status_code == 404
    assert job_rows(app) == (0, 0)


def test_a_job_cancelled_while_it_runs_stores_nothing_more(small_files: Flask, records: dict[str, Any]) -> None:
    client = small_files.test_client()
    exporter = exports(small_files)
    status = kick_off(client, "/fhir/$export?_type=Observation")
    job = exporter.jobs.claim(exporter.worker_id, 60)
    assert job is not None
    exporter.run(job, stop=after_one_chunk())
    assert client.get(status).headers["X-Progress"] == "50% (2 resources exported, now Observation)"
    assert client.delete(status).status_code == 202
    exporter.run(job)  # the rest of the run finds its job gone
    assert job_rows(small_files) == (0, 0)


def test_an_expired_job_is_404_and_deleted(app: Flask, client: FlaskClient, queued: Exporter) -> None:
    status = kick_off(client, "/fhir/$export?_type=Patient")
    finished(app, client, status)
    with app.extensions["iop_fhir.store"].engine.begin() as conn:
        conn.execute(schema.export_jobs.update().values(expires=1))
    assert client.get(status).status_code == 404
    assert job_rows(app) == (0, 0)


# -- nothing is lost -----------------------------------------------------------------------------------------


def run_worker(app: Flask) -> None:
    assert runtime.run_worker(app.config["IOP_FHIR"], once=True, store=app.extensions["iop_fhir.store"]) == 0


def test_a_queued_job_is_run_by_the_worker(
    app: Flask, client: FlaskClient, queued: Exporter, records: dict[str, Any]
) -> None:
    status = kick_off(client, "/fhir/$export?_type=Patient")
    run_worker(app)
    assert client.get(status).status_code == 200


def test_a_job_whose_process_died_is_resumed_by_the_worker_once_its_lease_expired(
    small_files: Flask, records: dict[str, Any]
) -> None:
    client = small_files.test_client()
    dead = exports(small_files)
    status = kick_off(client, "/fhir/$export?_type=Observation")
    dead.worker_id = "a-process-that-dies"
    job = dead.jobs.claim(dead.worker_id, 0)
    assert job is not None
    dead.run(job, stop=after_one_chunk())  # one chunk stored, then the process "dies" holding the job
    assert client.get(status).status_code == 202
    run_worker(small_files)
    manifest = client.get(status).get_json()
    assert [o["count"] for o in manifest["output"]] == [2, 2, 1]
    resumed = sum((lines(client, o["url"]) for o in manifest["output"]), [])
    assert sorted(r["id"] for r in resumed) == sorted(r["id"] for r in searched(client, "Observation"))


# -- 42 CFR Part 2 -------------------------------------------------------------------------------------------


def contract(kind: str, enrollment_id: str | None = None) -> dict[str, Any]:
    text = (CONTRACT / f"{kind}.json").read_text(encoding="utf-8")
    payload: dict[str, Any] = json.loads(text.replace("{{enrollment_id}}", enrollment_id or ""))
    return payload


def enroll(client: FlaskClient, mrn: str, family: str) -> dict[str, str]:
    payload = contract("enrollment")
    payload["patient"]["identifiers"][0]["value"] = mrn
    payload["patient"]["name"]["family"] = family
    response = client.post("/iop/enrollments", json=payload)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    refs = {ref.split("/", 1)[0]: ref for ref in reversed(body["fhir"])}
    assert client.post("/iop/sessions", json=contract("session", body["id"])).status_code == 201
    return {"enrollment": body["id"], "patient": refs["Patient"]}


@pytest.fixture
def program(app: Flask, client: FlaskClient, queued: Exporter) -> Iterator[dict[str, Any]]:
    """A partner, patient A who consented to disclosure to it, patient B who did not; the partner's client."""
    assert client.post("/iop/partners", json=contract("partner")).status_code == 201
    a = enroll(client, "MRN-A-1", "Consentida")
    b = enroll(client, "MRN-B-2", "Zyxwvut")
    consent = contract("consent", a["enrollment"])
    consent.update(signed_on="2026-01-01", expires_on="2099-01-01")
    response = client.post("/iop/consents", json=consent)
    assert response.status_code == 201, response.get_json()
    partner = as_client(app, mint(app, "system/*.rs", partner=PARTNER, client_id="test-partner"))
    yield {"a": a, "b": b, "partner": partner, "consent": response.get_json()["id"]}


def revoke_consent_of_a(client: FlaskClient, program: dict[str, Any]) -> None:
    revoked = client.post(f"/iop/consents/{program['consent']}/revoke", json={"revoked_on": "2026-06-01"})
    assert revoked.status_code == 200, revoked.get_json()


def consent_of_b(client: FlaskClient, program: dict[str, Any]) -> None:
    """Patient B now consents to disclosure to the partner too."""
    consent = contract("consent", program["b"]["enrollment"])
    consent.update(signed_on="2026-01-01", expires_on="2099-01-01")
    assert client.post("/iop/consents", json=consent).status_code == 201


def test_a_partner_export_holds_exactly_what_its_searches_show_only_consented_patients(
    app: Flask, program: dict[str, Any]
) -> None:
    partner = program["partner"]
    found = export_all(app, partner)
    assert ids(found["Patient"]) == {program["a"]["patient"]}
    text = orjson.dumps(found).decode()
    assert program["b"]["patient"] not in text and "Zyxwvut" not in text
    for res_type, resources in found.items():
        assert ids(resources) == ids(searched(partner, res_type))
    assert {"Encounter", "EpisodeOfCare", "Condition"} <= set(found)


def test_what_a_partner_exports_carries_the_redisclosure_mark_and_passes_the_validator(
    app: Flask, program: dict[str, Any], client: FlaskClient
) -> None:
    for resources in export_all(app, program["partner"]).values():
        for resource in resources:
            [mark] = [s for s in resource["meta"]["security"] if s["code"] == "RedisclosureProhibitionMark"]
            assert mark["extension"][0]["valueString"] == REDISCLOSURE_NOTICE
            assert [i for i in validate(resource) if i.severity in ("error", "fatal")] == []
    own = export_all(app, client, "/fhir/$export?_type=Patient")
    assert all("RedisclosureProhibitionMark" not in orjson.dumps(r).decode() for r in own["Patient"])


@pytest.mark.peers
def test_a_partner_export_with_its_redisclosure_marks_passes_the_independent_validator(
    app: Flask, program: dict[str, Any], tmp_path: Path
) -> None:
    partner = program["partner"]
    manifest = finished(app, partner, kick_off(partner))
    for number, item in enumerate(manifest["output"]):
        (tmp_path / f"{number}.{item['type']}.ndjson").write_bytes(partner.get(item["url"].removeprefix(BASE)).data)
    checked = subprocess.run([str(TOOLS / "fhir-validate"), str(tmp_path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert len(manifest["output"]) >= 5
    assert checked.stdout.count("OK ") == sum(item["count"] for item in manifest["output"])


def test_a_partner_export_is_audited_as_a_disclosure_of_each_patient(app: Flask, program: dict[str, Any]) -> None:
    found = export_all(app, program["partner"])
    patient_a = program["a"]["patient"]
    of_a = {
        f"{r['resourceType']}/{r['id']}"
        for resources in found.values()
        for r in resources
        if patient_a.split("/")[1] in patients_of(r) and r["resourceType"] != "Patient"
    }
    admin = as_client(app, admin_token(app))
    accounting = admin.get(f"/iop/enrollments/{program['a']['enrollment']}/disclosures").get_json()
    exports_of_a = [i for i in accounting["items"] if i["action"] == "operation"]
    assert exports_of_a and all(i["recipient"] == f"Organization/{PARTNER}" for i in exports_of_a)
    assert set(sum((i["resources"] for i in exports_of_a), [])) == of_a
    events = [e["resource"] for e in admin.get("/fhir/AuditEvent?_count=1000").get_json()["entry"]]
    by_partner = [e for e in events if e["agent"][0]["who"]["identifier"]["value"] == "test-partner"]
    assert by_partner and all(e["subtype"][0]["code"] == "operation" for e in by_partner)
    for event in by_partner:  # one event per patient: at most one Patient among its entities
        # the kick-off's event names none; a status poll's or a download's names only its query (the path)
        whats = [e["what"]["reference"] for e in event.get("entity", []) if "what" in e]
        assert [what for what in whats if what.startswith("Patient/")] in ([patient_a], [])
    other = admin.get(f"/iop/enrollments/{program['b']['enrollment']}/disclosures").get_json()
    assert other["total"] == 0


def test_consent_is_decided_again_when_the_job_runs(app: Flask, client: FlaskClient, program: dict[str, Any]) -> None:
    partner = program["partner"]
    status = kick_off(partner, "/fhir/$export?_type=Patient,Encounter")
    revoke_consent_of_a(client, program)
    assert exported(partner, finished(app, partner, status)) == {}


def test_files_a_partner_has_not_fetched_are_gone_once_a_consent_they_relied_on_is_revoked(
    app: Flask, client: FlaskClient, program: dict[str, Any]
) -> None:
    partner = program["partner"]
    status = kick_off(partner, "/fhir/$export?_type=Patient,Encounter")
    manifest = finished(app, partner, status)
    assert {item["type"] for item in manifest["output"]} == {"Patient", "Encounter"}
    own = finished(app, client, kick_off(client, "/fhir/$export?_type=Patient"))
    revoke_consent_of_a(client, program)
    response = partner.get(manifest["output"][0]["url"].removeprefix(BASE))
    assert response.status_code == 410, response.data
    assert issue(response)["code"] == "deleted"
    assert "consent" in issue(response)["diagnostics"]
    assert partner.get(status).status_code == 404
    assert job_rows(app)[0] == 1  # the partner's job and its files are deleted; the program's own job stays
    assert len(lines(client, own["output"][0]["url"])) == 2


def test_a_consent_given_after_a_partner_export_ran_leaves_its_files_readable(
    app: Flask, client: FlaskClient, program: dict[str, Any]
) -> None:
    partner = program["partner"]
    status = kick_off(partner, "/fhir/$export?_type=Patient")
    manifest = finished(app, partner, status)
    consent_of_b(client, program)
    assert partner.get(status).status_code == 200
    assert ids(lines(partner, manifest["output"][0]["url"])) == {program["a"]["patient"]}


def test_a_partner_job_resumed_after_a_revocation_is_gone_for_what_its_earlier_run_exported_under_the_consent(
    app: Flask, client: FlaskClient, program: dict[str, Any]
) -> None:
    partner = program["partner"]
    status = kick_off(partner, "/fhir/$export?_type=Encounter,Patient")
    exporter = exports(app)
    job = exporter.jobs.claim(exporter.worker_id, 60)
    assert job is not None
    exporter.run(job, stop=after_one_chunk())  # the Encounters of patient A stored, then the run stops
    revoke_consent_of_a(client, program)
    consent_of_b(client, program)
    stored = exporter.jobs.job(job.id)
    assert stored is not None and stored.exported > 0
    exporter.run(stored)  # a second run, under the lease it still holds: B's Patient now, A's Encounters before
    response = partner.get(status)
    assert response.status_code == 410, response.data
    assert issue(response)["code"] == "deleted"
    assert job_rows(app) == (0, 0)


def test_a_partner_export_leaves_out_counseling_notes_and_labelled_resources_of_no_patient(
    app: Flask, client: FlaskClient, program: dict[str, Any]
) -> None:
    labels = [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": c} for c in ("42CFRPart2", "SUD")]
    note_labels = [*labels, {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSYTHPN"}]
    note = {
        "meta": {"security": note_labels},
        "status": "current",
        "subject": {"reference": program["a"]["patient"]},
        "content": [{"attachment": {"contentType": "text/plain", "data": "bm90ZQ=="}}],
    }
    post(client, "DocumentReference", note)
    post(client, "Practitioner", {"meta": {"security": labels}, "name": [{"family": "Counselor"}]})
    found = export_all(app, program["partner"], "/fhir/$export?_type=DocumentReference,Practitioner,Patient")
    assert set(found) == {"Patient"}


def test_audit_events_are_never_exported_to_a_non_administrator(
    app: Flask, client: FlaskClient, program: dict[str, Any]
) -> None:
    assert client.get("/fhir/$export?_type=AuditEvent", headers=ASYNC).status_code == 403
    assert program["partner"].get("/fhir/$export?_type=AuditEvent", headers=ASYNC).status_code == 403
    assert "AuditEvent" not in export_all(app, client)
    assert "AuditEvent" not in export_all(app, program["partner"], "/fhir/Patient/$export")
    admin = as_client(app, admin_token(app))
    assert export_all(app, admin, "/fhir/$export?_type=AuditEvent")["AuditEvent"]


def test_an_administrator_exports_the_audit_log_as_fhir_audit_event_renders_it(
    app: Flask, client: FlaskClient, program: dict[str, Any]
) -> None:
    admin = as_client(app, admin_token(app))
    program["partner"].get(f"/fhir/{program['a']['patient']}")
    searched = admin.get("/fhir/AuditEvent?_count=1000").get_json()["entry"]
    before = {e["resource"]["id"]: e["resource"] for e in searched}
    exported_events = {e["id"]: e for e in export_all(app, admin, "/fhir/$export?_type=AuditEvent")["AuditEvent"]}
    assert before and set(before) <= set(exported_events)
    assert all(exported_events[event_id] == event for event_id, event in before.items())
    # At Patient level, the events about a patient: the partner's read of A among them.
    about = export_all(app, admin, "/fhir/Patient/$export?_type=AuditEvent")["AuditEvent"]
    assert all(e["entity"][0]["role"]["code"] == "1" for e in about)
    assert any(e["entity"][0]["what"]["reference"] == program["a"]["patient"] for e in about)


# -- discovery and the command line --------------------------------------------------------------------------


def test_the_capability_statement_lists_export_at_system_patient_and_group_level(sqlite_client: FlaskClient) -> None:
    statement = sqlite_client.get("/fhir/metadata").get_json()
    assert "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data" in statement["instantiates"]
    rest = statement["rest"][0]
    [export] = [o for o in rest["operation"] if o["name"] == "export"]
    assert export["definition"] == "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"
    by_type = {r["type"]: [o["name"] for o in r["operation"]] for r in rest["resource"]}
    assert by_type["Patient"] == by_type["Group"] == ["validate", "export"]
    assert by_type["Observation"] == ["validate"]


def test_iop_fhir_export_writes_one_ndjson_file_per_type_into_the_folder(
    sqlite_app: Flask,
    sqlite_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = sqlite_app.test_client()
    one = post(client, "Patient", {"name": [{"family": "One"}]})
    post(client, "Observation", observation(one))
    monkeypatch.setenv("IOP_FHIR_DATABASE_URL", sqlite_url)
    assert cli.main(["export", "--patient", "--type", "Patient,Observation", "--out", str(tmp_path / "out")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [(o["type"], o["count"], Path(o["path"]).name) for o in result["output"]] == [
        ("Observation", 1, "Observation.ndjson"),
        ("Patient", 1, "Patient.ndjson"),
    ]
    assert orjson.loads((tmp_path / "out" / "Patient.ndjson").read_bytes())["id"] == one
    assert job_rows(sqlite_app) == (0, 0)
    assert cli.main(["export", "--out", str(tmp_path / "out")]) == 2  # not an empty folder
    assert cli.main(["export", "--since", "yesterday", "--out", str(tmp_path / "new")]) == 2


# -- kick-off as the bulk-data clients send it ---------------------------------------------------------------

SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}


def kick_off_post(client: FlaskClient, path: str, *parameters: dict[str, Any], **headers: str) -> Any:
    body = {"resourceType": "Parameters", "parameter": list(parameters)}
    return client.post(path, data=orjson.dumps(body), content_type=FHIR, headers={**ASYNC, **headers})


def patient_ref(patient: str) -> dict[str, Any]:
    return {"name": "patient", "valueReference": {"reference": f"Patient/{patient}"}}


def posted_export(app: Flask, client: FlaskClient, path: str, *parameters: dict[str, Any]) -> dict[str, Any]:
    response = kick_off_post(client, path, *parameters)
    assert response.status_code == 202, response.get_json()
    return finished(app, client, response.headers["Content-Location"].removeprefix(BASE))


def test_a_post_kick_off_without_a_body_takes_its_parameters_from_the_query_string(
    app: Flask, client: FlaskClient, queued: Exporter, records: dict[str, Any]
) -> None:
    # What Medplum's bulkExport() sends: no body, no Content-Type.
    response = client.post("/fhir/$export?_type=Patient", headers=ASYNC)
    assert response.status_code == 202, response.get_json()
    manifest = finished(app, client, response.headers["Content-Location"].removeprefix(BASE))
    assert [(o["type"], o["count"]) for o in manifest["output"]] == [("Patient", 2)]
    assert manifest["request"] == f"{BASE}/fhir/$export?_type=Patient"


def test_a_post_kick_off_without_a_body_still_validates_its_query_parameters(client: FlaskClient) -> None:
    response = client.post("/fhir/$export?_type=Foo", headers=ASYNC)
    assert response.status_code == 400
    assert issue(response)["expression"] == ["_type"]


def test_a_post_kick_off_with_a_body_that_is_not_a_parameters_resource_is_still_refused(
    client: FlaskClient,
) -> None:
    as_text = client.post("/fhir/$export", data=b"_type=Patient", content_type="text/plain", headers=ASYNC)
    assert as_text.status_code == 415
    assert issue(as_text)["expression"] == ["Content-Type"]
    untyped = client.post("/fhir/$export", data=b'{"resourceType": "Parameters"}', headers=ASYNC)
    assert untyped.status_code == 415
    patient = client.post("/fhir/$export", json={"resourceType": "Patient"}, headers=ASYNC)
    assert patient.status_code == 400
    assert issue(patient)["expression"] == ["Parameters"]


def test_the_patient_parameter_exports_only_the_compartment_of_the_patient_named(
    app: Flask, client: FlaskClient, queued: Exporter, records: dict[str, Any]
) -> None:
    manifest = posted_export(app, client, "/fhir/Patient/$export", patient_ref(records["one"]))
    found = exported(client, manifest)
    assert ids(found["Patient"]) == {f"Patient/{records['one']}"}
    assert ids(found["Observation"]) == {f"Observation/{o}" for o in records["of_one"]}
    assert manifest["error"] == []


def test_the_patient_parameter_may_name_several_patients_and_an_absolute_reference(
    app: Flask, client: FlaskClient, queued: Exporter, records: dict[str, Any]
) -> None:
    absolute = {"name": "patient", "valueReference": {"reference": f"{BASE}/fhir/Patient/{records['two']}"}}
    manifest = posted_export(app, client, "/fhir/Patient/$export", patient_ref(records["one"]), absolute)
    found = exported(client, manifest)
    assert ids(found["Patient"]) == {f"Patient/{records['one']}", f"Patient/{records['two']}"}
    assert len(found["Observation"]) == 4


def test_the_patient_parameter_at_group_level_keeps_only_members_of_the_group(
    app: Flask, client: FlaskClient, queued: Exporter, records: dict[str, Any]
) -> None:
    # Patient two is an inactive member: named, it is still not exported, and said not found.
    path = f"/fhir/Group/{records['group']}/$export"
    manifest = posted_export(app, client, path, patient_ref(records["one"]), patient_ref(records["two"]))
    found = exported(client, manifest)
    assert ids(found["Patient"]) == {f"Patient/{records['one']}"}
    [error] = manifest["error"]
    [outcome] = lines(client, error["url"])
    assert [(i["severity"], i["code"]) for i in outcome["issue"]] == [("warning", "not-found")]
    assert records["two"] in outcome["issue"][0]["diagnostics"]


def test_an_unknown_patient_exports_nothing_and_is_reported_not_found_in_the_error_file(
    app: Flask, client: FlaskClient, queued: Exporter, records: dict[str, Any]
) -> None:
    manifest = posted_export(app, client, "/fhir/Patient/$export", patient_ref("nobody"))
    assert manifest["output"] == []
    [error] = manifest["error"]
    [outcome] = lines(client, error["url"])
    assert outcome["issue"][0]["code"] == "not-found"
    assert "Patient/nobody" in outcome["issue"][0]["diagnostics"]
    assert [i for i in validate(outcome) if i.severity in ("error", "fatal")] == []


@pytest.mark.parametrize("prefer", ["respond-async", "respond-async, handling=lenient"])
def test_the_patient_parameter_in_a_query_string_is_400_even_with_handling_lenient(
    client: FlaskClient, records: dict[str, Any], prefer: str
) -> None:
    # Ignoring it would export every patient: it is refused, never ignored.
    for method in (client.get, client.post):
        response = method(f"/fhir/Patient/$export?patient=Patient/{records['one']}", headers={"Prefer": prefer})
        assert response.status_code == 400
        assert (issue(response)["code"], issue(response)["expression"]) == ("not-supported", ["patient"])
        assert "valueReference" in issue(response)["diagnostics"]


@pytest.mark.parametrize("prefer", ["respond-async", "respond-async, handling=lenient"])
def test_the_patient_parameter_at_system_level_is_400_even_with_handling_lenient(
    client: FlaskClient, records: dict[str, Any], prefer: str
) -> None:
    response = kick_off_post(client, "/fhir/$export", patient_ref(records["one"]), Prefer=prefer)
    assert response.status_code == 400
    assert (issue(response)["code"], issue(response)["expression"]) == ("not-supported", ["patient"])


@pytest.mark.parametrize("reference", ["Observation/x", "Patient/", "nobody"])
def test_a_patient_parameter_that_is_no_patient_reference_is_400(client: FlaskClient, reference: str) -> None:
    parameter = {"name": "patient", "valueReference": {"reference": reference}}
    response = kick_off_post(client, "/fhir/Patient/$export", parameter)
    assert response.status_code == 400
    assert issue(response)["expression"] == ["patient"]


def test_type_filter_is_refused_even_with_handling_lenient_since_ignoring_it_would_export_more(
    client: FlaskClient,
) -> None:
    lenient = "respond-async, handling=lenient"
    response = client.get("/fhir/$export?_typeFilter=Observation%3Fstatus%3Dfinal", headers={"Prefer": lenient})
    assert response.status_code == 400
    assert (issue(response)["code"], issue(response)["expression"]) == ("not-supported", ["_typeFilter"])


def test_elements_keeps_only_the_elements_named_and_the_mandatory_ones_tagged_subsetted(
    app: Flask, client: FlaskClient, queued: Exporter, records: dict[str, Any]
) -> None:
    found = export_all(app, client, "/fhir/$export?_type=Patient,Observation&_elements=Patient.name,subject")
    for patient in found["Patient"]:
        assert set(patient) == {"resourceType", "id", "meta", "name"}
    for obs in found["Observation"]:
        assert set(obs) <= {"resourceType", "id", "meta", "status", "code", "subject"}  # status, code: 1..1
        assert {"status", "code"} <= set(obs)
    for resource in found["Patient"] + found["Observation"]:
        assert SUBSETTED in resource["meta"]["tag"]
        assert resource["meta"]["versionId"] and resource["meta"]["lastUpdated"]
        assert [i for i in validate(resource) if i.severity in ("error", "fatal")] == []


def test_elements_on_a_post_kick_off_and_with_handling_lenient_is_applied_not_ignored(
    app: Flask, client: FlaskClient, queued: Exporter, records: dict[str, Any]
) -> None:
    manifest = posted_export(
        app, client, "/fhir/Patient/$export", patient_ref(records["one"]), {"name": "_elements", "valueString": "id"}
    )
    [patient] = exported(client, manifest)["Patient"]
    assert set(patient) == {"resourceType", "id", "meta"}
    assert manifest["error"] == []


def test_progress_starts_with_a_percentage_of_the_types_done_never_above_100(
    small_files: Flask, records: dict[str, Any]
) -> None:
    client = small_files.test_client()
    exporter = exports(small_files)
    status = kick_off(client, "/fhir/$export?_type=Observation,Patient")
    assert client.get(status).headers["X-Progress"] == "0% (queued)"

    def one_chunk() -> None:  # a run that stores one chunk and stops; the next one resumes it (lease 0)
        job = exporter.jobs.claim(exporter.worker_id, 0)
        assert job is not None
        exporter.run(job, stop=after_one_chunk())

    one_chunk()
    assert client.get(status).headers["X-Progress"] == "25% (2 resources exported, now Observation)"
    seen = []
    while (polled := client.get(status)).status_code == 202:
        seen.append(polled.headers["X-Progress"])
        one_chunk()
    percents = [int(p.split("% (", 1)[0]) for p in seen]
    assert percents == sorted(percents) and all(0 <= p < 100 for p in percents), seen
    assert seen[-1].endswith("% (5 resources exported, now Observation)")


def test_a_patient_a_partner_may_not_see_is_answered_exactly_as_one_that_does_not_exist(
    app: Flask, program: dict[str, Any]
) -> None:
    partner = program["partner"]
    hidden = program["b"]["patient"].removeprefix("Patient/")  # exists, no consent to this partner
    answers = []
    for patient in (hidden, "00000000-0000-4000-8000-000000000000"):
        response = kick_off_post(partner, "/fhir/Patient/$export", patient_ref(patient))
        assert response.status_code == 202, response.get_json()
        manifest = finished(app, partner, response.headers["Content-Location"].removeprefix(BASE))
        assert manifest["output"] == []
        [error] = manifest["error"]
        [outcome] = lines(partner, error["url"])
        answers.append(orjson.dumps(outcome).decode().replace(patient, "<id>"))
    assert answers[0] == answers[1]
    assert "Zyxwvut" not in answers[0]


def test_a_partner_export_of_one_consented_patient_with_elements_keeps_the_part2_labels(
    app: Flask, program: dict[str, Any]
) -> None:
    partner = program["partner"]
    patient = program["a"]["patient"].removeprefix("Patient/")
    manifest = posted_export(
        app, partner, "/fhir/Patient/$export", patient_ref(patient), {"name": "_elements", "valueString": "id"}
    )
    found = exported(partner, manifest)
    assert ids(found["Patient"]) == {f"Patient/{patient}"}
    whole = exported(partner, posted_export(app, partner, "/fhir/Patient/$export", patient_ref(patient)))
    labels = {f"{r['resourceType']}/{r['id']}": r["meta"]["security"] for rs in whole.values() for r in rs}
    codes = set()
    for resources in found.values():
        for resource in resources:
            assert SUBSETTED in resource["meta"]["tag"]
            assert resource["meta"]["security"] == labels[f"{resource['resourceType']}/{resource['id']}"]
            codes |= {s["code"] for s in resource["meta"]["security"]}
            assert "RedisclosureProhibitionMark" in {s["code"] for s in resource["meta"]["security"]}
            assert [i for i in validate(resource) if i.severity in ("error", "fatal")] == []
    assert {"R", "42CFRPart2", "RedisclosureProhibitionMark"} <= codes


def test_progress_counts_the_types_done_before_the_current_one() -> None:
    job = ExportJob(
        id="x",
        client_id="c",
        principal={},
        request="",
        params=ExportRequest("system", types=("Encounter", "Observation", "Patient", "Group")).to_json(),
        status="running",
        created=0,
        cursor={"type": "Observation", "done": False},
        exported=4026,
    )
    access = Access(Principal(client_id="c", scopes=Scopes.parse("system/*.rs")), None)  # type: ignore[arg-type]
    assert progress(job, access) == "62% (4,026 resources exported, now Observation)"


def test_the_capability_statement_documents_the_export_parameters_patient_and_elements(
    sqlite_client: FlaskClient,
) -> None:
    rest = sqlite_client.get("/fhir/metadata").get_json()["rest"][0]
    patient = next(r for r in rest["resource"] if r["type"] == "Patient")
    for operations in (rest["operation"], patient["operation"]):
        [export] = [o for o in operations if o["name"] == "export"]
        assert "patient" in export["documentation"] and "_elements" in export["documentation"]


@pytest.mark.peers
def test_an_export_subsetted_by_elements_passes_the_independent_validator(
    app: Flask, client: FlaskClient, queued: Exporter, records: dict[str, Any], tmp_path: Path
) -> None:
    manifest = finished(app, client, kick_off(client, "/fhir/Patient/$export?_elements=Patient.name,subject"))
    for number, item in enumerate(manifest["output"]):
        (tmp_path / f"{number}.{item['type']}.ndjson").write_bytes(client.get(item["url"].removeprefix(BASE)).data)
    checked = subprocess.run([str(TOOLS / "fhir-validate"), str(tmp_path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("OK ") == sum(item["count"] for item in manifest["output"]) > 0
