"""The /iop API end to end on both databases: contract payloads in, FHIR resources out, and back."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

CONTRACT = Path(__file__).resolve().parents[2].parent / "shared" / "contract"
PLURAL = {
    "enrollment": "enrollments",
    "assessment": "assessments",
    "treatment-plan": "treatment-plans",
    "session": "sessions",
    "consent": "consents",
    "discharge": "discharges",
    "partner": "partners",
}
PART2 = {
    ("http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "R"),
    ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "42CFRPart2"),
    ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "SUD"),
    ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "NORDSCLCD"),
}


def contract(kind: str, enrollment_id: str | None = None) -> dict[str, Any]:
    text = (CONTRACT / f"{kind}.json").read_text(encoding="utf-8")
    if enrollment_id is not None:
        text = text.replace("{{enrollment_id}}", enrollment_id)
    payload: dict[str, Any] = json.loads(text)
    return payload


def post(client: Any, kind: str, payload: dict[str, Any]) -> Any:
    return client.post(f"/iop/{PLURAL[kind]}", json=payload)


def read(client: Any, reference: str) -> dict[str, Any]:
    response = client.get(f"/fhir/{reference}")
    assert response.status_code == 200, reference
    body: dict[str, Any] = response.get_json()
    return body


def resource_count(client: Any) -> int:
    total = 0
    for res_type in ("Patient", "EpisodeOfCare", "Condition", "Observation", "CarePlan", "Encounter", "Provenance"):
        total += client.get(f"/fhir/{res_type}?_summary=count").get_json()["total"]
    return total


@pytest.fixture
def program(client: Any) -> dict[str, Any]:
    """A partner and an enrollment, as a program starts."""
    assert post(client, "partner", contract("partner")).status_code == 201
    response = post(client, "enrollment", contract("enrollment"))
    assert response.status_code == 201, response.get_json()
    return {"enrollment_id": response.get_json()["id"], "enrollment": response.get_json()}


@pytest.mark.parametrize("kind", ["assessment", "treatment-plan", "session", "consent"])
def test_contract_payload_is_accepted_as_it_is_and_its_resources_are_readable(
    client: Any, program: dict[str, Any], kind: str
) -> None:
    payload = contract(kind, program["enrollment_id"])
    response = post(client, kind, payload)
    assert response.status_code == 201, response.get_json()
    assert response.content_type == "application/json"
    body = response.get_json()
    assert response.headers["Location"].endswith(f"/iop/{PLURAL[kind]}/{body['id']}")
    for key, value in payload.items():
        assert body[key] == value
    assert body["fhir"] and all("/" in ref for ref in body["fhir"])
    for reference in body["fhir"]:
        resource = read(client, reference)
        labels = {(s["system"], s["code"]) for s in resource["meta"]["security"]}
        assert PART2 <= labels, reference
        assert resource["meta"]["profile"][0].startswith("https://iop-fhir.org/fhir/StructureDefinition/")


def test_enrollment_produces_patient_episode_conditions_and_contacts(client: Any, program: dict[str, Any]) -> None:
    types = [ref.split("/")[0] for ref in program["enrollment"]["fhir"]]
    assert types.count("Patient") == 1
    assert types.count("EpisodeOfCare") == 1
    assert types.count("Condition") == 2
    assert types.count("RelatedPerson") == 2
    assert types[-1] == "Provenance"
    patient_ref = next(r for r in program["enrollment"]["fhir"] if r.startswith("Patient/"))
    episodes = client.get(f"/fhir/EpisodeOfCare?patient={patient_ref}").get_json()
    assert episodes["total"] == 1
    episode = episodes["entry"][0]["resource"]
    assert episode["status"] == "active"
    assert episode["period"] == {"start": "2026-01-05"}
    codes = {c["code"] for t in episode["type"] for c in t["coding"]}
    assert "2.1" in codes
    conditions = client.get(f"/fhir/Condition?subject={patient_ref}&code=http://hl7.org/fhir/sid/icd-10-cm|F10.20")
    assert conditions.get_json()["total"] == 1


def test_replaying_a_record_returns_the_same_record_and_duplicates_nothing(
    client: Any, program: dict[str, Any]
) -> None:
    payload = contract("session", program["enrollment_id"])
    first = post(client, "session", payload)
    before = resource_count(client)
    again = post(client, "session", payload)
    assert again.status_code == 200
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.get_json()["fhir"] == first.get_json()["fhir"]
    assert resource_count(client) == before


def test_same_record_with_other_content_is_a_conflict_pointing_at_put(client: Any, program: dict[str, Any]) -> None:
    payload = contract("session", program["enrollment_id"])
    first = post(client, "session", payload).get_json()
    payload["craving_score"] = 7
    response = post(client, "session", payload)
    assert response.status_code == 409
    issue = response.get_json()["issue"][0]
    assert issue["code"] == "duplicate"
    assert f"PUT /iop/sessions/{first['id']}" in issue["diagnostics"]


def test_unknown_enrollment_is_refused_and_changes_nothing(client: Any, program: dict[str, Any]) -> None:
    before = resource_count(client)
    response = post(client, "session", contract("session", "00000000-0000-4000-8000-000000000000"))
    assert response.status_code == 422
    issue = response.get_json()["issue"][0]
    assert issue["code"] == "not-found"
    assert issue["expression"] == ["enrollment_id"]
    assert resource_count(client) == before


def test_consent_for_an_unknown_partner_is_refused(client: Any, program: dict[str, Any]) -> None:
    payload = contract("consent", program["enrollment_id"])
    payload["recipient"] = "no-such-partner"
    response = post(client, "consent", payload)
    assert response.status_code == 422
    assert response.get_json()["issue"][0]["expression"] == ["recipient"]
    assert "partner 'no-such-partner' is not known" in response.get_json()["issue"][0]["diagnostics"]


def test_unknown_code_lists_the_allowed_values_and_changes_nothing(client: Any, program: dict[str, Any]) -> None:
    payload = contract("session", program["enrollment_id"])
    payload["drug_screen"]["results"][1]["analyte"] = "kryptonite"
    before = resource_count(client)
    response = post(client, "session", payload)
    assert response.status_code == 400
    issue = response.get_json()["issue"][0]
    assert issue["code"] == "code-invalid"
    assert issue["expression"] == ["drug_screen.results[1].analyte"]
    assert "'kryptonite'" in issue["diagnostics"] and "cannabinoids" in issue["diagnostics"]
    assert resource_count(client) == before


def test_item_scores_that_do_not_add_up_are_refused(client: Any, program: dict[str, Any]) -> None:
    payload = contract("assessment", program["enrollment_id"])
    payload["instruments"][0]["total_score"] = 13
    response = post(client, "assessment", payload)
    assert response.status_code == 400
    issue = response.get_json()["issue"][0]
    assert issue["code"] == "invariant"
    assert issue["expression"] == ["instruments[0].total_score"]
    assert "add up to 12" in issue["diagnostics"]


def test_missing_total_is_computed_and_stored(client: Any, program: dict[str, Any]) -> None:
    payload = contract("assessment", program["enrollment_id"])
    del payload["instruments"][0]["total_score"]
    body = post(client, "assessment", payload).get_json()
    assert body["instruments"][0]["total_score"] == 12
    totals = [read(client, ref) for ref in body["fhir"] if ref.startswith("Observation/")]
    phq9 = next(o for o in totals if o["code"]["coding"][0]["code"] == "44261-6")
    assert phq9["valueQuantity"]["value"] == 12
    severity = {c["code"] for c in phq9["interpretation"][0]["coding"]}
    assert "severity-moderate" in severity


def test_weekly_hours_are_stored_and_low_intensity_is_a_warning_on_the_response_and_the_careplan(
    client: Any, program: dict[str, Any]
) -> None:
    payload = contract("treatment-plan", program["enrollment_id"])
    ok = post(client, "treatment-plan", payload).get_json()
    assert ok["weekly_treatment_hours"] == 9.17
    assert "warnings" not in ok
    low = copy.deepcopy(payload)
    low["period"]["start"] = "2026-02-01"
    low["interventions"] = [i for i in low["interventions"] if i["service"] != "group-therapy"]
    response = post(client, "treatment-plan", low)
    assert response.status_code == 201
    body = response.get_json()
    assert body["weekly_treatment_hours"] == 3.17
    assert body["warnings"][0]["severity"] == "warning"
    assert "below the 9 h/week" in body["warnings"][0]["diagnostics"]
    careplan = read(client, next(r for r in body["fhir"] if r.startswith("CarePlan/")))
    extensions = {e["url"].rsplit("/", 1)[1]: e for e in careplan["extension"]}
    assert extensions["weekly-treatment-hours"]["valueQuantity"]["value"] == 3.17
    assert "below the 9 h/week" in extensions["intensity-warning"]["valueString"]


def test_missed_session_is_a_cancelled_encounter_with_its_attendance(client: Any, program: dict[str, Any]) -> None:
    payload = contract("session", program["enrollment_id"])
    payload.update(attendance="no-show")
    for key in ("craving_score", "drug_screen", "progress_note"):
        del payload[key]
    body = post(client, "session", payload).get_json()
    encounter = read(client, next(r for r in body["fhir"] if r.startswith("Encounter/")))
    assert encounter["status"] == "cancelled"
    attendance = next(e for e in encounter["extension"] if e["url"].endswith("/session-attendance"))
    assert attendance["valueCoding"]["code"] == "attendance-no-show"


def test_progress_note_is_stored_but_in_no_resource(client: Any, program: dict[str, Any]) -> None:
    payload = contract("session", program["enrollment_id"])
    body = post(client, "session", payload).get_json()
    stored = client.get(f"/iop/sessions/{body['id']}").get_json()
    assert stored["progress_note"] == payload["progress_note"]
    for reference in body["fhir"]:
        assert payload["progress_note"] not in json.dumps(read(client, reference))


def test_provenance_links_every_resource_to_the_record(client: Any, program: dict[str, Any]) -> None:
    body = post(client, "session", contract("session", program["enrollment_id"])).get_json()
    provenance = read(client, body["fhir"][-1])
    assert provenance["resourceType"] == "Provenance"
    targets = {t["reference"].split("/_history/")[0] for t in provenance["target"]}
    assert targets == set(body["fhir"][:-1])
    assert provenance["entity"][0]["what"]["identifier"]["value"] == f"session/{body['id']}"


def test_put_remaps_the_same_resources_as_new_versions(client: Any, program: dict[str, Any]) -> None:
    payload = contract("session", program["enrollment_id"])
    first = post(client, "session", payload).get_json()
    payload["craving_score"] = 8
    response = client.put(f"/iop/sessions/{first['id']}", json=payload)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["fhir"] == first["fhir"]
    assert body["meta"]["version"] == 2
    craving = next(
        read(client, r)
        for r in body["fhir"]
        if r.startswith("Observation/") and "craving" in json.dumps(read(client, r))
    )
    assert craving["valueInteger"] == 8
    assert craving["meta"]["versionId"] == "2"


def test_put_accepts_a_record_as_it_was_read(client: Any, program: dict[str, Any]) -> None:
    first = post(client, "session", contract("session", program["enrollment_id"])).get_json()
    response = client.put(f"/iop/sessions/{first['id']}", json=first)
    assert response.status_code == 200, response.get_json()


def test_put_that_drops_a_diagnosis_retracts_its_condition(client: Any, program: dict[str, Any]) -> None:
    payload = contract("enrollment")
    payload["diagnoses"] = payload["diagnoses"][:1]
    response = client.put(f"/iop/enrollments/{program['enrollment_id']}", json=payload)
    assert response.status_code == 200, response.get_json()
    dropped = [r for r in program["enrollment"]["fhir"] if r.startswith("Condition/")][1]
    condition = read(client, dropped)
    assert condition["verificationStatus"]["coding"][0]["code"] == "entered-in-error"


def test_retracted_record_marks_its_resources_entered_in_error_and_stays_readable(
    client: Any, program: dict[str, Any]
) -> None:
    body = post(client, "session", contract("session", program["enrollment_id"])).get_json()
    response = client.post(f"/iop/sessions/{body['id']}/retract", json={"reason": "wrong patient"})
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["meta"]["status"] == "entered-in-error"
    assert client.get(f"/iop/sessions/{body['id']}").get_json()["meta"]["status"] == "entered-in-error"
    for reference in body["fhir"]:
        resource = read(client, reference)
        if resource["resourceType"] in ("Encounter", "Observation", "Specimen"):
            assert resource["status"] == "entered-in-error", reference


def test_discharge_finishes_the_episode_completes_the_plan_and_records_goal_outcomes(
    client: Any, program: dict[str, Any]
) -> None:
    eid = program["enrollment_id"]
    plan = post(client, "treatment-plan", contract("treatment-plan", eid)).get_json()
    response = post(client, "discharge", contract("discharge", eid))
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    episode = read(client, next(r for r in program["enrollment"]["fhir"] if r.startswith("EpisodeOfCare/")))
    assert episode["status"] == "finished"
    assert episode["period"]["end"] == "2026-03-27"
    careplan = read(client, next(r for r in plan["fhir"] if r.startswith("CarePlan/")))
    assert careplan["status"] == "completed"
    goals = [read(client, r) for r in plan["fhir"] if r.startswith("Goal/")]
    outcomes = {g["description"]["text"]: g["achievementStatus"]["coding"][0]["code"] for g in goals}
    assert outcomes["Reduce PHQ-9 total score below 10"] == "improving"
    task = read(client, next(r for r in body["fhir"] if r.startswith("Task/")))
    assert task["owner"]["reference"] == "Organization/passaic-valley-recovery"
    assert task["code"]["coding"][0]["code"] == "fulfill"
    assert task["focus"]["reference"] in body["fhir"]
    # Retracting the discharge reopens what it closed.
    client.post(f"/iop/discharges/{body['id']}/retract")
    assert read(client, episode["resourceType"] + "/" + episode["id"])["status"] == "active"
    assert read(client, f"CarePlan/{careplan['id']}")["status"] == "active"


def test_discharge_with_an_unknown_goal_key_is_refused(client: Any, program: dict[str, Any]) -> None:
    eid = program["enrollment_id"]
    post(client, "treatment-plan", contract("treatment-plan", eid))
    payload = contract("discharge", eid)
    payload["goal_outcomes"][2]["goal"] = "sobriety"
    response = post(client, "discharge", payload)
    assert response.status_code == 422
    issue = response.get_json()["issue"][0]
    assert issue["expression"] == ["goal_outcomes[2].goal"]
    assert "'sobriety'" in issue["diagnostics"] and "abstinence" in issue["diagnostics"]


@pytest.mark.parametrize("kind", ["enrollment", "assessment", "treatment-plan", "session", "consent", "partner"])
def test_reverse_mapping_of_stored_resources_gives_back_the_record(
    app: Any, client: Any, program: dict[str, Any], kind: str
) -> None:
    if kind == "enrollment":
        rid = program["enrollment_id"]
    elif kind == "partner":
        rid = "passaic-valley-recovery"
    else:
        rid = post(client, kind, contract(kind, program["enrollment_id"])).get_json()["id"]
    service = app.extensions["iop_fhir.records"]
    record = service.store.record(kind, rid)
    private = service.engine.spec(kind).private
    expected = {k: v for k, v in record.content.items() if k not in private}
    assert service.reverse(record) == expected


def test_list_filters_by_enrollment_and_pages(client: Any, program: dict[str, Any]) -> None:
    eid = program["enrollment_id"]
    payload = contract("session", eid)
    for day in ("07", "08", "09"):
        payload["start"] = f"2026-01-{day}T18:00:00-05:00"
        payload["end"] = f"2026-01-{day}T21:00:00-05:00"
        assert post(client, "session", payload).status_code == 201
    page = client.get(f"/iop/sessions?enrollment={eid}&count=2").get_json()
    assert page["total"] == 3
    assert len(page["items"]) == 2
    rest = client.get(f"/iop/sessions?enrollment={eid}&count=2&offset=2").get_json()
    assert [i["start"][:10] for i in rest["items"]] == ["2026-01-09"]
    other = client.get("/iop/sessions?enrollment=someone-else").get_json()
    assert other["total"] == 0
