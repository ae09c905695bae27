"""One Patient per person (iop/persons.py): an enrollment reuses the Patient an inbound referral or an earlier
enrollment made for the same identifier (system and value); a readmission is a new EpisodeOfCare of the same Patient;
the same identifier with another birth date is a 409 naming both, and nothing is written."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import orjson

CONTRACT = Path(__file__).resolve().parents[2].parent / "shared" / "contract"
FHIR = "application/fhir+json"
MRN_SYSTEM = "urn:oid:2.16.840.1.113883.19.5.99999.1"


def contract(name: str) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads((CONTRACT / f"{name}.json").read_text(encoding="utf-8"))
    return payload


def _patient_of(body: dict[str, Any]) -> str:
    [patient] = [ref for ref in body["fhir"] if ref.startswith("Patient/")]
    return patient


def _read(client: Any, reference: str) -> dict[str, Any]:
    response = client.get(f"/fhir/{reference}")
    assert response.status_code == 200, reference
    found: dict[str, Any] = response.get_json()
    return found


def _patients(client: Any, mrn: str) -> list[str]:
    bundle = client.get(f"/fhir/Patient?identifier={MRN_SYSTEM}|{mrn}").get_json()
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


def _episodes(client: Any, patient: str) -> list[dict[str, Any]]:
    bundle = client.get(f"/fhir/EpisodeOfCare?patient={patient}").get_json()
    return [e["resource"] for e in bundle.get("entry", [])]


def _readmission(first: dict[str, Any], day: str) -> dict[str, Any]:
    again = copy.deepcopy(first)
    again["admission_date"] = day
    return again


def test_a_readmission_is_a_new_episode_of_the_same_patient(client: Any) -> None:
    first = contract("enrollment")
    one = client.post("/iop/enrollments", json=first)
    assert one.status_code == 201, one.get_json()
    two = client.post("/iop/enrollments", json=_readmission(first, "2026-06-01"))
    assert two.status_code == 201, two.get_json()

    patient = _patient_of(one.get_json())
    assert _patient_of(two.get_json()) == patient
    assert _patients(client, "MRN-448812") == [patient.split("/")[1]]
    episodes = _episodes(client, patient)
    assert len(episodes) == 2 and {e["period"]["start"] for e in episodes} == {"2026-01-05", "2026-06-01"}
    # each enrollment's other resources point at the one Patient
    for body in (one.get_json(), two.get_json()):
        for reference in body["fhir"]:
            resource = _read(client, reference)
            text = orjson.dumps(resource).decode()
            assert "Patient/" not in text.replace(patient, "") or resource["resourceType"] == "Provenance", reference


def test_sessions_of_a_readmission_point_at_the_same_patient(client: Any) -> None:
    first = contract("enrollment")
    client.post("/iop/enrollments", json=first)
    second = client.post("/iop/enrollments", json=_readmission(first, "2026-06-01")).get_json()
    session = contract("session")
    session = json.loads(json.dumps(session).replace("{{enrollment_id}}", second["id"]))
    session["start"], session["end"] = "2026-06-02T18:00:00-05:00", "2026-06-02T21:00:00-05:00"
    session["drug_screen"]["collected_at"] = "2026-06-02T18:05:00-05:00"
    created = client.post("/iop/sessions", json=session)
    assert created.status_code == 201, created.get_json()
    [encounter] = [r for r in created.get_json()["fhir"] if r.startswith("Encounter/")]
    assert _read(client, encounter)["subject"]["reference"] == _patient_of(second)


def test_an_enrollment_reuses_the_patient_an_inbound_referral_brought(client: Any) -> None:
    bundle = contract("inbound-referral-bundle")
    response = client.post("/fhir", data=orjson.dumps(bundle), content_type=FHIR)
    assert response.status_code == 200, response.get_json()
    [referred] = _patients(client, "MRN-552310")
    referred_before = _read(client, f"Patient/{referred}")

    enrollment = contract("enrollment")
    enrollment["patient"]["identifiers"] = [{"system": MRN_SYSTEM, "value": "MRN-552310"}]
    enrollment["patient"]["birth_date"] = referred_before["birthDate"]
    created = client.post("/iop/enrollments", json=enrollment)

    assert created.status_code == 201, created.get_json()
    assert _patient_of(created.get_json()) == f"Patient/{referred}"
    assert _patients(client, "MRN-552310") == [referred]
    after = _read(client, f"Patient/{referred}")
    assert after["meta"]["versionId"] == "2"
    # the program's demographics, and every identifier the Patient already had
    before_ids = {(i["system"], i["value"]) for i in referred_before.get("identifier", [])}
    assert before_ids <= {(i["system"], i.get("value")) for i in after["identifier"]}


def test_the_same_identifier_with_another_birth_date_is_a_conflict_naming_both_and_writes_nothing(
    client: Any,
) -> None:
    first = client.post("/iop/enrollments", json=contract("enrollment")).get_json()
    patient = _patient_of(first)
    other = contract("enrollment")
    other["patient"]["birth_date"] = "1990-01-01"
    other["admission_date"] = "2026-06-01"

    response = client.post("/iop/enrollments", json=other)

    assert response.status_code == 409, response.get_json()
    [issue] = response.get_json()["issue"]
    assert issue["code"] == "conflict" and issue["expression"] == ["patient.birth_date"]
    assert (
        patient in issue["diagnostics"]
        and "1987-04-12" in issue["diagnostics"]
        and "1990-01-01" in issue["diagnostics"]
    )
    assert client.get("/iop/enrollments").get_json()["total"] == 1
    assert len(_episodes(client, patient)) == 1
    assert _read(client, patient)["meta"]["versionId"] == "1"


def test_identifiers_that_match_two_patients_are_a_conflict_naming_them(client: Any) -> None:
    for mrn in ("MRN-A", "MRN-B"):
        body = {
            "resourceType": "Patient",
            "identifier": [{"system": MRN_SYSTEM, "value": mrn}],
            "birthDate": "1987-04-12",
        }
        assert client.post("/fhir/Patient", data=orjson.dumps(body), content_type=FHIR).status_code == 201
    enrollment = contract("enrollment")
    enrollment["patient"]["identifiers"] = [
        {"system": MRN_SYSTEM, "value": "MRN-A"},
        {"system": MRN_SYSTEM, "value": "MRN-B"},
    ]

    response = client.post("/iop/enrollments", json=enrollment)

    assert response.status_code == 409
    [issue] = response.get_json()["issue"]
    assert issue["expression"] == ["patient.identifiers"]
    for mrn in ("MRN-A", "MRN-B"):
        assert f"Patient/{_patients(client, mrn)[0]}" in issue["diagnostics"]
    assert client.get("/iop/enrollments").get_json()["total"] == 0


def test_retracting_one_enrollment_keeps_the_patient_active_for_the_other(client: Any) -> None:
    first = contract("enrollment")
    one = client.post("/iop/enrollments", json=first).get_json()
    two = client.post("/iop/enrollments", json=_readmission(first, "2026-06-01")).get_json()
    patient = _patient_of(one)

    assert client.post(f"/iop/enrollments/{two['id']}/retract", json={"reason": "duplicate"}).status_code == 200
    assert _read(client, patient)["active"] is True
    assert client.post(f"/iop/enrollments/{one['id']}/retract", json={"reason": "test"}).status_code == 200
    assert _read(client, patient)["active"] is False


def test_a_put_keeps_the_patient_the_enrollment_was_given(client: Any) -> None:
    first = contract("enrollment")
    one = client.post("/iop/enrollments", json=first).get_json()
    two = client.post("/iop/enrollments", json=_readmission(first, "2026-06-01")).get_json()
    changed = _readmission(first, "2026-06-01")
    changed["patient"]["phone"] = "+1-973-555-0101"
    response = client.put(f"/iop/enrollments/{two['id']}", json=changed)
    assert response.status_code == 200, response.get_json()
    assert _patient_of(response.get_json()) == _patient_of(one)
    telecom = _read(client, _patient_of(one))["telecom"]
    assert {"system": "phone", "value": "+1-973-555-0101"} in telecom
