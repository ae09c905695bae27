"""Group sessions through /iop on both databases: one record for the event, each attendee's resources exactly those of
a session of their own, linked by the group's identifier and naming no other attendee (42 CFR Part 2)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask.testing import FlaskClient

from tests.mutations import mutate, paths

CONTRACT = Path(__file__).resolve().parents[2].parent / "shared" / "contract"
GROUP_SYSTEM = "https://iop-fhir.org/fhir/sid/group-session"
RECORD_SYSTEM = "https://iop-fhir.org/fhir/sid/iop-record"
PLACEHOLDERS = ("{{enrollment_id}}", "{{enrollment_id_2}}", "{{enrollment_id_3}}")
# Three patients of the program; none of their names or record numbers may appear in another's resources.
PATIENTS = (("MRN-G-1001", "Abernathy"), ("MRN-G-2002", "Brightwater"), ("MRN-G-3003", "Castellanos"))


def _contract(kind: str) -> str:
    return (CONTRACT / f"{kind}.json").read_text(encoding="utf-8")


def group_contract(enrollment_ids: list[str]) -> dict[str, Any]:
    """The contract group session, as it is, naming the given enrollments."""
    text = _contract("group-session")
    for placeholder, enrollment_id in zip(PLACEHOLDERS[::-1], enrollment_ids[::-1], strict=True):
        text = text.replace(placeholder, enrollment_id)
    payload: dict[str, Any] = json.loads(text)
    return payload


def urine_group(enrollment_ids: list[str]) -> dict[str, Any]:
    """The contract group session with urine screens only (every specimen of the contract is not mappable yet)."""
    payload = group_contract(enrollment_ids)
    payload["attendees"][0]["drug_screen"]["specimen"] = "urine"
    payload["attendees"][1]["drug_screen"] = {
        "specimen": "urine",
        "collected_at": "2026-01-12T18:40:00-05:00",
        "results": [{"analyte": "ethyl-glucuronide", "result": "negative"}],
    }
    return payload


def enroll(client: FlaskClient, mrn: str, family: str) -> dict[str, str]:
    payload = json.loads(_contract("enrollment"))
    payload["patient"]["identifiers"][0]["value"] = mrn
    payload["patient"]["name"]["family"] = family
    response = client.post("/iop/enrollments", json=payload)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    refs = {ref.split("/", 1)[0]: ref for ref in body["fhir"]}
    return {
        "enrollment": body["id"],
        "patient": refs["Patient"],
        "episode": refs["EpisodeOfCare"],
        "mrn": mrn,
        "family": family,
    }


@pytest.fixture
def patients(client: FlaskClient) -> list[dict[str, str]]:
    return [enroll(client, mrn, family) for mrn, family in PATIENTS]


def ids_of(patients: list[dict[str, str]]) -> list[str]:
    return [p["enrollment"] for p in patients]


def post(client: FlaskClient, payload: dict[str, Any]) -> Any:
    return client.post("/iop/group-sessions", json=payload)


def read(client: FlaskClient, reference: str) -> dict[str, Any]:
    response = client.get(f"/fhir/{reference}")
    assert response.status_code == 200, reference
    resource: dict[str, Any] = response.get_json()
    return resource


def by_patient(client: FlaskClient, record: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The record's resources, by the Patient they are about (the shared facilitator under "Practitioner")."""
    out: dict[str, list[dict[str, Any]]] = {}
    for reference in record["fhir"]:
        resource = read(client, reference)
        if resource["resourceType"] == "Provenance":
            continue
        owner = resource.get("subject", {}).get("reference", resource["resourceType"])
        out.setdefault(owner, []).append(resource)
    return out


def references_in(value: Any) -> set[str]:
    if isinstance(value, dict):
        found = {value["reference"]} if isinstance(value.get("reference"), str) else set()
        for item in value.values():
            found |= references_in(item)
        return found
    if isinstance(value, list):
        return set().union(*(references_in(v) for v in value)) if value else set()
    return set()


def outcome(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.get_json()
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome"
    issue: dict[str, Any] = body["issue"][0]
    return issue


def fhir_count(client: FlaskClient) -> int:
    return sum(
        client.get(f"/fhir/{t}?_summary=count").get_json()["total"]
        for t in ("Encounter", "Observation", "Specimen", "Practitioner", "Provenance")
    )


# -- one record, each attendee's resources -----------------------------------------------------------------------


def test_the_contract_group_session_is_accepted_as_it_is(client: FlaskClient, patients: list[dict[str, str]]) -> None:
    payload = group_contract(ids_of(patients))
    response = post(client, payload)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert body["id"] == "G-2026-01-12-EVE-CBT"
    assert {k: body[k] for k in payload} == payload


def test_a_group_session_is_one_record_with_each_attendees_session_resources(
    client: FlaskClient, patients: list[dict[str, str]]
) -> None:
    payload = urine_group(ids_of(patients))
    response = post(client, payload)
    assert response.status_code == 201, response.get_json()
    record = response.get_json()
    assert record["id"] == "G-2026-01-12-EVE-CBT"
    assert response.headers["Location"].endswith("/iop/group-sessions/G-2026-01-12-EVE-CBT")
    assert record["meta"]["kind"] == "group-session"
    # The progress notes stay with the record, as a session's does.
    assert record["attendees"][0]["progress_note"] == payload["attendees"][0]["progress_note"]
    assert client.get("/iop/group-sessions/G-2026-01-12-EVE-CBT").get_json() == record
    listed = client.get("/iop/group-sessions").get_json()
    assert listed["total"] == 1 and listed["items"] == [record]

    owned = by_patient(client, record)
    first, second, third = (owned[p["patient"]] for p in patients)
    assert [r["resourceType"] for r in owned["Practitioner"]] == ["Practitioner"]

    def encounter(resources: list[dict[str, Any]]) -> dict[str, Any]:
        (found,) = [r for r in resources if r["resourceType"] == "Encounter"]
        assert {"system": GROUP_SYSTEM, "value": "G-2026-01-12-EVE-CBT"} in found["identifier"]
        return found

    def observations(resources: list[dict[str, Any]], code: str) -> list[dict[str, Any]]:
        return [
            r for r in resources if r["resourceType"] == "Observation" and r["category"][0]["coding"][0]["code"] == code
        ]

    assert encounter(first)["status"] == "finished"
    assert [o["valueInteger"] for o in observations(first, "survey")] == [3]
    screens = observations(first, "laboratory")
    assert len(screens) == 3
    assert all(o["encounter"]["reference"] == f"Encounter/{encounter(first)['id']}" for o in screens)
    assert [r["resourceType"] for r in first].count("Specimen") == 1

    assert encounter(second)["status"] == "finished"  # late is attended
    assert [o["valueInteger"] for o in observations(second, "survey")] == [6]
    assert len(observations(second, "laboratory")) == 1

    # The no-show has an Encounter, cancelled, and nothing else.
    assert [r["resourceType"] for r in third] == ["Encounter"]
    assert encounter(third)["status"] == "cancelled"
    assert "length" not in encounter(third)

    for resources in (first, second, third):
        for resource in resources:
            labels = {(s["system"], s["code"]) for s in resource["meta"]["security"]}
            assert ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "42CFRPart2") in labels
    everything = orjson.dumps([first, second, third]).decode()
    for attendee in payload["attendees"]:
        if "progress_note" in attendee:
            assert attendee["progress_note"] not in everything


def test_no_attendees_resource_names_or_counts_another_attendee(
    client: FlaskClient, patients: list[dict[str, str]]
) -> None:
    record = post(client, urine_group(ids_of(patients))).get_json()
    owned = by_patient(client, record)
    practitioners = {f"Practitioner/{r['id']}" for r in owned["Practitioner"]}
    encounters = {
        p["patient"]: next(f"Encounter/{r['id']}" for r in owned[p["patient"]] if r["resourceType"] == "Encounter")
        for p in patients
    }
    for patient in patients:
        mine = owned[patient["patient"]]
        text = orjson.dumps(mine).decode()
        for other in patients:
            if other is patient:
                continue
            for secret in (other["patient"], other["enrollment"], other["episode"], other["mrn"], other["family"]):
                assert secret.split("/")[-1] not in text, (patient["family"], secret)
            assert encounters[other["patient"]].split("/")[1] not in text
        # Everything an attendee's resource points at is theirs (or the facilitator): no partOf a group resource, no
        # participant but the facilitator.
        own = {f"{r['resourceType']}/{r['id']}" for r in mine}
        assert references_in(mine) <= own | practitioners | {patient["patient"], patient["episode"]}
        (encounter,) = [r for r in mine if r["resourceType"] == "Encounter"]
        assert "partOf" not in encounter
        assert [p["individual"]["reference"] for p in encounter["participant"]] == sorted(practitioners)
        # The group is named by its id only.
        linking = [i for i in encounter["identifier"] if i["system"] != RECORD_SYSTEM]
        assert linking == [{"system": GROUP_SYSTEM, "value": "G-2026-01-12-EVE-CBT"}]
    # Nothing counts the attendees: with one attendee fewer, the others' resources are the very same versions.
    fewer = urine_group(ids_of(patients))
    del fewer["attendees"][1]
    assert client.put("/iop/group-sessions/G-2026-01-12-EVE-CBT", json=fewer).status_code == 200
    for patient in (patients[0], patients[2]):
        for resource in owned[patient["patient"]]:
            assert read(client, f"{resource['resourceType']}/{resource['id']}") == resource


def test_each_attendees_encounter_is_found_by_the_group_identifier(
    client: FlaskClient, patients: list[dict[str, str]]
) -> None:
    post(client, urine_group(ids_of(patients)))
    found = client.get(f"/fhir/Encounter?identifier={GROUP_SYSTEM}|G-2026-01-12-EVE-CBT").get_json()
    assert sorted(e["resource"]["subject"]["reference"] for e in found["entry"]) == sorted(
        p["patient"] for p in patients
    )


def test_an_attendees_medications_interpret_their_screen_as_in_a_session_of_their_own(
    client: FlaskClient, patients: list[dict[str, str]]
) -> None:
    medication = json.loads(_contract("medication").replace("{{enrollment_id}}", patients[0]["enrollment"]))
    assert client.post("/iop/medications", json=medication).status_code == 201
    # The second attendee's buprenorphine is not explained: the medication is the first attendee's.
    payload = urine_group(ids_of(patients))
    payload["attendees"][1]["drug_screen"]["results"].append({"analyte": "buprenorphine", "result": "positive"})
    response = post(client, payload)
    assert response.status_code == 201, response.get_json()
    record = response.get_json()
    (warning,) = record["warnings"]
    assert warning["expression"] == ["attendees[0].drug_screen.results[1]"]
    owned = by_patient(client, record)

    def buprenorphine(patient: dict[str, str]) -> dict[str, Any]:
        return next(
            r
            for r in owned[patient["patient"]]
            if r["resourceType"] == "Observation" and "buprenorphine" in json.dumps(r["code"]).lower()
        )

    assert [c["code"] for i in buprenorphine(patients[0])["interpretation"] for c in i["coding"]] == ["POS", "EXP"]
    assert [c["code"] for i in buprenorphine(patients[1])["interpretation"] for c in i["coding"]] == ["POS"]
    # The record as read may be sent back: nothing changes.
    again = client.put("/iop/group-sessions/G-2026-01-12-EVE-CBT", json=record)
    assert again.status_code == 200, again.get_json()
    assert again.get_json()["attendees"] == record["attendees"]


def test_replaying_a_group_session_answers_200_and_changes_nothing(
    client: FlaskClient, patients: list[dict[str, str]]
) -> None:
    payload = urine_group(ids_of(patients))
    first = post(client, payload).get_json()
    versions = {ref: read(client, ref)["meta"]["versionId"] for ref in first["fhir"]}
    count = fhir_count(client)
    again = post(client, payload)
    assert again.status_code == 200
    assert again.get_json() == first
    assert {ref: read(client, ref)["meta"]["versionId"] for ref in first["fhir"]} == versions
    assert fhir_count(client) == count


def test_attendee_resource_ids_are_distinct_and_stable(client: FlaskClient, patients: list[dict[str, str]]) -> None:
    payload = urine_group(ids_of(patients))
    first = post(client, payload).get_json()
    encounters = [r for r in first["fhir"] if r.startswith("Encounter/")]
    assert len(set(encounters)) == 3
    # A correction of the group's time and topic updates the same resources.
    payload["topic"] = "relapse prevention: weekends"
    payload["start"], payload["end"] = "2026-01-12T18:30:00-05:00", "2026-01-12T21:30:00-05:00"
    again = client.put("/iop/group-sessions/G-2026-01-12-EVE-CBT", json=payload)
    assert again.status_code == 200, again.get_json()
    assert again.get_json()["fhir"] == first["fhir"]
    assert [read(client, r)["period"]["start"] for r in encounters] == ["2026-01-12T18:30:00-05:00"] * 3


def test_a_correction_removing_an_attendee_marks_theirs_entered_in_error_and_leaves_the_others(
    client: FlaskClient, patients: list[dict[str, str]]
) -> None:
    payload = urine_group(ids_of(patients))
    record = post(client, payload).get_json()
    before = by_patient(client, record)
    removed = patients[1]
    corrected = copy.deepcopy(payload)
    del corrected["attendees"][1]
    response = client.put("/iop/group-sessions/G-2026-01-12-EVE-CBT", json=corrected)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["meta"]["version"] == 2
    assert [a["enrollment_id"] for a in response.get_json()["attendees"]] == [
        patients[0]["enrollment"],
        patients[2]["enrollment"],
    ]
    for resource in before[removed["patient"]]:
        now = read(client, f"{resource['resourceType']}/{resource['id']}")
        assert now["status"] == "entered-in-error", resource["resourceType"]
    for patient in (patients[0], patients[2]):
        for resource in before[patient["patient"]]:
            now = read(client, f"{resource['resourceType']}/{resource['id']}")
            assert now == resource  # same version: nothing about them changed


def test_a_correction_adding_an_attendee_creates_theirs(client: FlaskClient, patients: list[dict[str, str]]) -> None:
    payload = urine_group(ids_of(patients))
    two = copy.deepcopy(payload)
    del two["attendees"][2]
    post(client, two)
    response = client.put("/iop/group-sessions/G-2026-01-12-EVE-CBT", json=payload)
    assert response.status_code == 200, response.get_json()
    owned = by_patient(client, response.get_json())
    assert [r["status"] for r in owned[patients[2]["patient"]]] == ["cancelled"]


def test_a_correction_changing_an_attendees_craving_updates_that_observation(
    client: FlaskClient, patients: list[dict[str, str]]
) -> None:
    payload = urine_group(ids_of(patients))
    first = post(client, payload).get_json()
    payload["attendees"][1]["craving_score"] = 8
    updated = client.put("/iop/group-sessions/G-2026-01-12-EVE-CBT", json=payload).get_json()
    assert sorted(updated["fhir"]) == sorted(first["fhir"])
    cravings = [r for r in by_patient(client, updated)[patients[1]["patient"]] if r.get("valueInteger") is not None]
    assert [(c["valueInteger"], c["meta"]["versionId"]) for c in cravings] == [(8, "2")]


def test_retracting_a_group_session_marks_every_attendees_resources_entered_in_error(
    client: FlaskClient, patients: list[dict[str, str]]
) -> None:
    record = post(client, urine_group(ids_of(patients))).get_json()
    response = client.post("/iop/group-sessions/G-2026-01-12-EVE-CBT/retract", json={"reason": "wrong group"})
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["meta"]["status"] == "entered-in-error"
    for reference in record["fhir"]:
        resource = read(client, reference)
        if resource["resourceType"] in ("Provenance", "Practitioner"):
            continue
        assert resource["status"] == "entered-in-error", reference


# -- refusals ----------------------------------------------------------------------------------------------------


def test_an_unknown_attendee_enrollment_is_refused_naming_the_attendee(
    client: FlaskClient, patients: list[dict[str, str]]
) -> None:
    payload = urine_group(ids_of(patients))
    payload["attendees"][2]["enrollment_id"] = "00000000-0000-4000-8000-000000000000"
    count = fhir_count(client)
    issue = outcome(post(client, payload), 422)
    assert issue["code"] == "not-found"
    assert issue["expression"] == ["attendees[2].enrollment_id"]
    assert fhir_count(client) == count
    assert client.get("/iop/group-sessions").get_json()["total"] == 0


def test_a_retracted_attendee_enrollment_is_refused(client: FlaskClient, patients: list[dict[str, str]]) -> None:
    assert client.post(f"/iop/enrollments/{patients[1]['enrollment']}/retract").status_code == 200
    issue = outcome(post(client, urine_group(ids_of(patients))), 422)
    assert issue["expression"] == ["attendees[1].enrollment_id"]
    assert "entered in error" in issue["diagnostics"]


def test_the_same_enrollment_twice_is_refused(client: FlaskClient, patients: list[dict[str, str]]) -> None:
    payload = urine_group(ids_of(patients))
    payload["attendees"][2]["enrollment_id"] = patients[0]["enrollment"]
    issue = outcome(post(client, payload), 422)
    assert issue["code"] == "duplicate"
    assert issue["expression"] == ["attendees[2].enrollment_id"]
    assert "attendees[0]" in issue["diagnostics"]


def test_a_group_session_needs_an_attendee(client: FlaskClient, patients: list[dict[str, str]]) -> None:
    payload = urine_group(ids_of(patients))
    payload["attendees"] = []
    issue = outcome(post(client, payload), 400)
    assert issue["expression"] == ["attendees"]
    del payload["attendees"]
    assert outcome(post(client, payload), 400)["code"] == "required"


def test_an_attendees_unknown_code_is_refused_at_the_attendees_field(
    client: FlaskClient, patients: list[dict[str, str]]
) -> None:
    payload = urine_group(ids_of(patients))
    payload["attendees"][2]["attendance"] = "asleep"
    payload["attendees"][0]["drug_screen"]["results"][1]["analyte"] = "kryptonite"
    response = post(client, payload)
    assert response.status_code == 400
    issues = {i["expression"][0]: i["code"] for i in response.get_json()["issue"]}
    assert issues == {
        "attendees[2].attendance": "code-invalid",
        "attendees[0].drug_screen.results[1].analyte": "code-invalid",
    }


def test_a_put_may_not_rename_the_group(client: FlaskClient, patients: list[dict[str, str]]) -> None:
    payload = urine_group(ids_of(patients))
    post(client, payload)
    payload["group_id"] = "G-OTHER"
    issue = outcome(client.put("/iop/group-sessions/G-2026-01-12-EVE-CBT", json=payload), 400)
    assert issue["expression"] == ["group_id"]


def test_a_different_group_session_under_the_same_id_is_a_conflict(
    client: FlaskClient, patients: list[dict[str, str]]
) -> None:
    payload = urine_group(ids_of(patients))
    post(client, payload)
    payload["topic"] = "another topic"
    issue = outcome(post(client, payload), 409)
    assert issue["code"] == "duplicate"
    assert issue["expression"] == ["group_id"]
    assert "PUT /iop/group-sessions/G-2026-01-12-EVE-CBT" in issue["diagnostics"]


def _other_type(value: Any) -> Any:
    if isinstance(value, str):
        return 5
    if isinstance(value, bool | int | float):
        return str(value)
    return {} if isinstance(value, list) else []


def test_every_field_deleted_null_empty_or_of_another_type_is_refused_naming_it_or_accepted(
    sqlite_client: FlaskClient,
) -> None:
    client = sqlite_client
    enrollments = [enroll(client, mrn, family)["enrollment"] for mrn, family in PATIENTS]
    payload = group_contract(enrollments)
    assert post(client, payload).status_code == 201
    target = "/iop/group-sessions/G-2026-01-12-EVE-CBT"
    before = client.get(target).get_json()
    found = []
    for path in list(paths(payload))[1:]:
        current: Any = payload
        for step in path:
            current = current[step]
        for how, value in [("delete", None), ("set", None), ("set", ""), ("set", _other_type(current))]:
            body = mutate(copy.deepcopy(payload), path, value, how)
            response = client.put(target, json=body)
            if response.status_code >= 500:
                found.append((path, how, value, response.status_code))
            elif response.status_code >= 400:
                issues = response.get_json()["issue"]
                if not all(i.get("expression") for i in issues) or client.get(target).get_json() != before:
                    found.append((path, how, value, response.get_json()))
            elif client.put(target, json=payload).status_code != 200:  # accepted: put the contract back
                found.append((path, how, value, "could not restore"))
            else:
                before = client.get(target).get_json()
    assert found == []


# -- Part 2: a partner who may see one attendee learns nothing of the others -------------------------------------


def test_a_partner_sees_the_consented_attendee_only_and_nothing_of_the_group(
    client: FlaskClient, program: dict[str, Any]
) -> None:
    a, b = program["a"], program["b"]
    payload = urine_group([a["enrollment"], b["enrollment"], b["enrollment"]])
    del payload["attendees"][2]
    record = post(client, payload).get_json()
    assert record["id"] == "G-2026-01-12-EVE-CBT", record
    partner = program["partner"]
    found = partner.get(f"/fhir/Encounter?identifier={GROUP_SYSTEM}|G-2026-01-12-EVE-CBT&_total=accurate").get_json()
    assert found["total"] == 1
    assert found["entry"][0]["resource"]["subject"]["reference"] == a["patient"]
    # B's resources and the record's Provenance (which lists every attendee's resources) are not found.
    owned = by_patient(client, record)
    for resource in owned[b["patient"]]:
        assert partner.get(f"/fhir/{resource['resourceType']}/{resource['id']}").status_code == 404
    provenance = next(r for r in record["fhir"] if r.startswith("Provenance/"))
    assert partner.get(f"/fhir/{provenance}").status_code == 404
    seen = orjson.dumps(partner.get("/fhir/Encounter?_revinclude=Provenance:target").get_json()).decode()
    assert b["patient"].split("/")[1] not in seen
