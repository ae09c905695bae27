"""Sync from hospital EHRs: what an enrolled patient's hospital changed is stored once, under ids derived from the
hospital's, and a sync interrupted half-way resumes where it stopped without losing or duplicating anything."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests
import responses
from flask import Flask
from flask.testing import FlaskClient

from iop_fhir import cli
from iop_fhir.config import Settings
from iop_fhir.errors import Unprocessable
from iop_fhir.exchange import sync

CONTRACT = Path(__file__).resolve().parents[3] / "shared" / "contract"
BASE = "https://ehr.stjoseph.example/fhir/R4"
PARTNER = {
    "id": "st-joseph-ehr",
    "kind": "hospital-ehr",
    "name": "St. Joseph Regional Medical Center",
    "fhir_base_url": BASE,
    "auth": {"type": "none"},
}
MRN_SYSTEM = "urn:oid:2.16.840.1.113883.19.5.99999.1"
MRN = "MRN-448812"
THEIR_PATIENT = "p-77"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"


def contract(kind: str) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads((CONTRACT / f"{kind}.json").read_text(encoding="utf-8"))
    return payload


def at(hour: int, minute: int = 0) -> str:
    return f"2026-01-05T{hour:02d}:{minute:02d}:00.000+00:00"


def condition(rid: str, updated: str, code: str = "38341003", patient: str = THEIR_PATIENT) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": rid,
        "meta": {"versionId": "1", "lastUpdated": updated},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
        "recorder": {"reference": "Practitioner/dr-12"},
    }


def medication_request(rid: str, updated: str) -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "id": rid,
        "meta": {"lastUpdated": updated},
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {
            "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "1116632"}]
        },
        "subject": {"reference": f"{BASE}/Patient/{THEIR_PATIENT}"},
    }


def observation(rid: str, updated: str, category: str = "laboratory") -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": rid,
        "meta": {"lastUpdated": updated},
        "status": "final",
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": category}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "1742-6"}]},
        "subject": {"reference": f"Patient/{THEIR_PATIENT}"},
        "valueQuantity": {"value": 31, "unit": "U/L", "system": "http://unitsofmeasure.org", "code": "U/L"},
    }


class Hospital:
    """A hospital FHIR server: patient search by identifier, and searches by patient (and category) that honour
    ``_lastUpdated`` (ge, gt) and, unless told not to, ``_sort=_lastUpdated``, two resources a page."""

    def __init__(self, *, sorts: bool = True) -> None:
        self.resources: dict[str, list[dict[str, Any]]] = {}
        self.sorts = sorts
        self.fail_once: set[tuple[str, int]] = set()  # (type, offset) answered 500 the next time it is asked for
        self.searches: list[dict[str, list[str]]] = []

    def add(self, *resources: dict[str, Any]) -> None:
        for resource in resources:
            found = self.resources.setdefault(resource["resourceType"], [])
            found[:] = [r for r in found if r["id"] != resource["id"]] + [resource]

    def __call__(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        parts = urlsplit(str(request.url))
        res_type = parts.path.rsplit("/", 1)[-1]
        params = parse_qs(parts.query)
        self.searches.append({"type": [res_type], **params})
        if res_type == "Patient":
            matches = (
                [{"resourceType": "Patient", "id": THEIR_PATIENT}]
                if params["identifier"] == [f"{MRN_SYSTEM}|{MRN}"]
                else []
            )
            return 200, {}, json.dumps(bundle(matches))
        offset = int(params.get("_offset", ["0"])[0])
        if (res_type, offset) in self.fail_once:
            self.fail_once.discard((res_type, offset))
            return 500, {}, ""
        matches = [r for r in self.resources.get(res_type, []) if self._matches(r, params)]
        if self.sorts:
            matches.sort(key=lambda r: r["meta"]["lastUpdated"])
        page = matches[offset : offset + 2]
        used = {k: v[0] for k, v in params.items() if k not in ("type", "_offset")}
        if not self.sorts:
            used.pop("_sort", None)  # R4: the self link carries the parameters the server used

        def link(relation: str, at_offset: int) -> dict[str, str]:
            return {"relation": relation, "url": f"{BASE}/{res_type}?{urlencode(used | {'_offset': str(at_offset)})}"}

        links = [link("self", offset)] + ([link("next", offset + 2)] if offset + 2 < len(matches) else [])
        return 200, {}, json.dumps(bundle(page, links))

    @staticmethod
    def _matches(resource: dict[str, Any], params: dict[str, list[str]]) -> bool:
        if resource["subject"]["reference"].rsplit("/", 1)[-1] != params["patient"][0]:
            return False
        if "category" in params:
            codes = [c["code"] for cat in resource.get("category", []) for c in cat["coding"]]
            if params["category"][0] not in codes:
                return False
        for value in params.get("_lastUpdated", []):
            prefix, moment = value[:2], value[2:]
            updated = resource["meta"]["lastUpdated"]
            if (prefix == "ge" and updated < moment) or (prefix == "gt" and updated <= moment):
                return False
        return True


def bundle(resources: list[dict[str, Any]], links: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links or [],
        "entry": [{"resource": copy.deepcopy(r), "search": {"mode": "match"}} for r in resources],
    }


@pytest.fixture
def hospital() -> Iterator[Hospital]:
    server = Hospital()
    server.add(
        condition("c1", at(10)),
        condition("c2", at(11)),
        condition("c3", at(12)),
        condition("c-other", at(10), patient="p-99"),
        medication_request("m1", at(9)),
        observation("o1", at(8)),
        observation("o-vitals", at(8), category="vital-signs"),
    )
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add_callback(responses.GET, re.compile(re.escape(BASE) + r"/\w+"), callback=server)
        yield server


@pytest.fixture
def enrolled(client: FlaskClient) -> str:
    assert client.post("/iop/partners", json=PARTNER).status_code == 201
    assert client.post("/iop/partners", json=contract("partner")).status_code == 201  # aftercare: never pulled from
    response = client.post("/iop/enrollments", json=contract("enrollment"))
    assert response.status_code == 201
    patient: str = next(r for r in response.get_json()["fhir"] if r.startswith("Patient/"))
    return patient.split("/", 1)[1]


def run(app: Flask, settings: Settings, partner_id: str | None = None) -> sync.SyncReport:
    store, repository = app.extensions["iop_fhir.store"], app.extensions["iop_fhir.repository"]
    return sync.sync_all(store, repository, settings, partner_id=partner_id)


def stored(client: FlaskClient, res_type: str, patient: str) -> list[dict[str, Any]]:
    """The patient's resources that came from the hospital (the enrollment made Conditions of its own)."""
    found = client.get(f"/fhir/{res_type}?subject=Patient/{patient}&_count=100").get_json()
    resources = [e["resource"] for e in found.get("entry", [])]
    return [r for r in resources if r["meta"].get("source", "").startswith(BASE)]


def sources(client: FlaskClient, res_type: str, patient: str) -> list[str]:
    return sorted(r["meta"]["source"] for r in stored(client, res_type, patient))


def cursor(app: Flask, patient: str, res_type: str) -> str | None:
    value: str | None = app.extensions["iop_fhir.store"].sync_cursor(PARTNER["id"], patient, res_type)
    return value


def test_sync_stores_the_conditions_medications_and_lab_results_of_enrolled_patients(
    app: Flask, client: FlaskClient, settings: Settings, hospital: Hospital, enrolled: str
) -> None:
    report = run(app, settings)
    assert report.ok, report.to_json()
    assert report.to_json()["stored"] == 5
    assert sources(client, "Condition", enrolled) == [f"{BASE}/Condition/c{n}" for n in (1, 2, 3)]
    assert sources(client, "MedicationRequest", enrolled) == [f"{BASE}/MedicationRequest/m1"]
    assert sources(client, "Observation", enrolled) == [f"{BASE}/Observation/o1"]
    first = next(r for r in stored(client, "Condition", enrolled) if r["meta"]["source"].endswith("/c1"))
    assert first["id"] == sync.sync_id(PARTNER["id"], "Condition", "c1")
    assert first["subject"] == {"reference": f"Patient/{enrolled}"}
    assert first["recorder"] == {"reference": f"{BASE}/Practitioner/dr-12"}  # theirs, not one of ours
    assert "security" not in first["meta"]  # hospital data is not a Part 2 record
    assert cursor(app, enrolled, "Condition") == at(12)


def test_a_second_sync_asks_only_for_changes_and_stores_nothing_twice(
    app: Flask, client: FlaskClient, settings: Settings, hospital: Hospital, enrolled: str
) -> None:
    run(app, settings)
    hospital.searches.clear()
    report = run(app, settings)
    assert report.ok
    assert report.to_json()["stored"] == 0
    conditions = [s for s in hospital.searches if s["type"] == ["Condition"]]
    assert conditions[0]["_lastUpdated"] == [f"ge{at(12)}"]
    assert conditions[0]["_sort"] == ["_lastUpdated"]
    assert len(stored(client, "Condition", enrolled)) == 3
    assert {r["meta"]["versionId"] for r in stored(client, "Condition", enrolled)} == {"1"}


def test_a_change_at_the_hospital_updates_the_same_resource(
    app: Flask, client: FlaskClient, settings: Settings, hospital: Hospital, enrolled: str
) -> None:
    run(app, settings)
    hospital.add(condition("c2", at(13), code="66590003"), condition("c4", at(14)))
    report = run(app, settings)
    assert report.to_json()["stored"] == 2
    conditions = {r["meta"]["source"].rsplit("/", 1)[1]: r for r in stored(client, "Condition", enrolled)}
    assert sorted(conditions) == ["c1", "c2", "c3", "c4"]
    assert conditions["c2"]["meta"]["versionId"] == "2"
    assert conditions["c2"]["code"]["coding"][0]["code"] == "66590003"
    assert cursor(app, enrolled, "Condition") == at(14)


def test_sync_resumes_after_the_hospital_fails_mid_search(
    app: Flask, client: FlaskClient, settings: Settings, hospital: Hospital, enrolled: str
) -> None:
    hospital.fail_once.add(("Condition", 2))
    report = run(app, settings)
    failed = next(s for s in report.streams if s.res_type == "Condition")
    assert failed.error is not None and "500" in failed.error
    assert (failed.stored, failed.cursor) == (2, at(11))  # the first page is stored, and the cursor is past it
    assert sources(client, "Condition", enrolled) == [f"{BASE}/Condition/c1", f"{BASE}/Condition/c2"]

    report = run(app, settings)
    assert report.ok
    assert sources(client, "Condition", enrolled) == [f"{BASE}/Condition/c{n}" for n in (1, 2, 3)]
    assert cursor(app, enrolled, "Condition") == at(12)


def test_sync_resumes_after_a_crash_mid_search(
    app: Flask,
    client: FlaskClient,
    settings: Settings,
    hospital: Hospital,
    enrolled: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = 0
    original = sync.store_resource

    def crash_on_the_third(*args: Any) -> bool:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("the process dies here")
        return original(*args)

    monkeypatch.setattr(sync, "store_resource", crash_on_the_third)
    with pytest.raises(RuntimeError):
        run(app, settings)
    assert cursor(app, enrolled, "Condition") == at(11)
    monkeypatch.setattr(sync, "store_resource", original)

    assert run(app, settings).ok
    assert sources(client, "Condition", enrolled) == [f"{BASE}/Condition/c{n}" for n in (1, 2, 3)]
    assert len(stored(client, "MedicationRequest", enrolled)) == len(stored(client, "Observation", enrolled)) == 1


def test_an_unsorted_search_moves_the_cursor_only_once_complete(
    app: Flask, client: FlaskClient, settings: Settings, enrolled: str
) -> None:
    hospital = Hospital(sorts=False)
    # The first page looks sorted (10:00, 12:00); the second holds the 11:00 one.
    hospital.add(condition("c1", at(10)), condition("c3", at(12)), condition("c2", at(11)))
    hospital.fail_once.add(("Condition", 2))
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add_callback(responses.GET, re.compile(re.escape(BASE) + r"/\w+"), callback=hospital)
        run(app, settings)
        # Moving the cursor to 12:00 after the first page would have skipped c2 (11:00) for good.
        assert cursor(app, enrolled, "Condition") is None
        assert run(app, settings).ok
    assert sources(client, "Condition", enrolled) == [f"{BASE}/Condition/c{n}" for n in (1, 2, 3)]
    assert cursor(app, enrolled, "Condition") == at(12)


def test_a_resource_about_another_patient_is_not_stored(
    app: Flask, client: FlaskClient, settings: Settings, hospital: Hospital, enrolled: str
) -> None:
    wrong = condition("c5", at(15))
    wrong["subject"] = {"reference": "Patient/p-99"}
    hospital.add(wrong)
    hospital._matches = lambda resource, params: resource["resourceType"] == "Condition"  # type: ignore[method-assign]
    report = run(app, settings)
    failed = next(s for s in report.streams if s.res_type == "Condition")
    assert failed.error is not None and "Condition.subject" in failed.error
    assert f"{BASE}/Condition/c5" not in sources(client, "Condition", enrolled)
    assert f"{BASE}/Condition/c-other" not in sources(client, "Condition", enrolled)


def test_a_patient_the_hospital_does_not_know_is_listed_and_skipped(
    app: Flask, client: FlaskClient, settings: Settings, hospital: Hospital
) -> None:
    assert client.post("/iop/partners", json=PARTNER).status_code == 201
    enrollment = contract("enrollment")
    enrollment["patient"]["identifiers"][0]["value"] = "MRN-000001"
    enrollment_id = client.post("/iop/enrollments", json=enrollment).get_json()["id"]
    report = run(app, settings)
    assert report.ok
    assert report.unmatched == [{"partner": PARTNER["id"], "enrollment": enrollment_id}]
    assert report.streams == []


def test_a_patient_the_hospital_knows_twice_is_not_pulled(app: Flask, settings: Settings, enrolled: str) -> None:
    answer = bundle([{"resourceType": "Patient", "id": THEIR_PATIENT}, {"resourceType": "Patient", "id": "p-78"}])
    with responses.RequestsMock() as mock:
        mock.get(f"{BASE}/Patient", json=answer)
        report = run(app, settings)
    assert not report.ok
    assert [s["error"] for s in report.skipped] == [
        "more than one patient at the partner has the enrollment's first identifier"
    ]
    assert report.streams == []


def test_only_hospital_ehr_partners_are_pulled_from(
    app: Flask, settings: Settings, hospital: Hospital, enrolled: str
) -> None:
    report = run(app, settings)
    assert {s.partner for s in report.streams} == {PARTNER["id"]}
    with pytest.raises(Unprocessable):
        run(app, settings, partner_id="passaic-valley-recovery")


def test_the_sync_command_runs_one_pass(
    app: Flask,
    settings: Settings,
    hospital: Hospital,
    enrolled: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("IOP_FHIR_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("IOP_FHIR_SEED_CONFORMANCE", "0")
    assert cli.main(["sync", "--once", "--partner", PARTNER["id"]]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["stored"] == 5
    assert cli.main(["sync", "--once", "--partner", "no-such-partner"]) == 2


def test_resources_sharing_the_cursor_instant_are_not_skipped_on_resume(
    app: Flask, client: FlaskClient, settings: Settings, enrolled: str
) -> None:
    hospital = Hospital()
    hospital.add(condition("c1", at(10)), condition("c2", at(11)), condition("c3", at(11)))
    hospital.fail_once.add(("Condition", 2))
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add_callback(responses.GET, re.compile(re.escape(BASE) + r"/\w+"), callback=hospital)
        run(app, settings)
        assert cursor(app, enrolled, "Condition") == at(11)  # c3, also 11:00, is on the page that failed
        assert run(app, settings).ok
    assert sources(client, "Condition", enrolled) == [f"{BASE}/Condition/c{n}" for n in (1, 2, 3)]


def test_what_sync_stores_reaches_matching_subscriptions(
    app: Flask, client: FlaskClient, settings: Settings, hospital: Hospital, enrolled: str
) -> None:
    subscription = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "New lab results of enrolled patients",
        "criteria": "Observation?category=laboratory",
        "channel": {"type": "rest-hook", "endpoint": "https://hooks.example.org/labs"},
    }
    sub_id = client.post("/fhir/Subscription", json=subscription).get_json()["id"]
    run(app, settings)
    rows, _ = app.extensions["iop_fhir.store"].deliveries(partner_id=f"subscription:{sub_id}")
    assert [(r.record_kind, r.record_id) for r in rows] == [
        ("Observation", sync.sync_id(PARTNER["id"], "Observation", "o1"))
    ]
