"""US Core 6.1.0 from the /iop records, end to end on both databases: the demographics of an enrollment (race,
ethnicity, preferred language), the primary diagnosis ranked first, the plan addressing the enrollment's diagnoses,
the clinical status a discharge records, and every resource of the contract records valid against the US Core
profile it claims, by the server's own $validate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

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
US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition/"
CDC_RACE = "urn:oid:2.16.840.1.113883.6.238"
FHIR = "application/fhir+json"


def contract(name: str, enrollment_id: str | None = None) -> dict[str, Any]:
    text = (CONTRACT / f"{name}.json").read_text(encoding="utf-8")
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


def produced(client: Any, record: dict[str, Any], res_type: str) -> list[dict[str, Any]]:
    return [read(client, ref) for ref in record["fhir"] if ref.startswith(f"{res_type}/")]


def errors(outcome: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        (i["code"], (i.get("expression") or [""])[0], i.get("diagnostics", ""))
        for i in outcome["issue"]
        if i["severity"] in ("error", "fatal")
    ]


@pytest.fixture
def program(client: Any) -> dict[str, Any]:
    assert post(client, "partner", contract("partner")).status_code == 201
    response = post(client, "enrollment", contract("enrollment"))
    assert response.status_code == 201, response.get_json()
    return {"enrollment_id": response.get_json()["id"], "enrollment": response.get_json()}


def test_demographics_contract_is_accepted_as_it_is_and_maps_to_us_core_race_ethnicity_and_language(
    client: Any,
) -> None:
    payload = contract("enrollment-demographics")
    response = post(client, "enrollment", payload)
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["patient"] == payload["patient"]
    patient = produced(client, response.get_json(), "Patient")[0]
    by_url = {e["url"]: e["extension"] for e in patient["extension"]}
    assert by_url[US_CORE + "us-core-race"] == [
        {
            "url": "ombCategory",
            "valueCoding": {"system": CDC_RACE, "code": "2054-5", "display": "Black or African American"},
        },
        {"url": "text", "valueString": "Black or African American"},
    ]
    assert by_url[US_CORE + "us-core-ethnicity"] == [
        {
            "url": "ombCategory",
            "valueCoding": {"system": CDC_RACE, "code": "2186-5", "display": "Not Hispanic or Latino"},
        },
        {"url": "text", "valueString": "Not Hispanic or Latino"},
    ]
    assert patient["communication"] == [
        {"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "en", "display": "English"}]}, "preferred": True}
    ]
    assert patient["meta"]["profile"] == [
        "https://iop-fhir.org/fhir/StructureDefinition/iop-patient",
        US_CORE + "us-core-patient",
    ]
    validated = client.post(
        f"/fhir/Patient/$validate?profile={US_CORE}us-core-patient", json=patient, headers={"Content-Type": FHIR}
    )
    assert errors(validated.get_json()) == []


def test_several_races_are_each_an_omb_category_and_named_together_in_the_text(client: Any) -> None:
    payload = contract("enrollment-demographics")
    payload["patient"]["race"] = ["white", "asian"]
    payload["patient"]["ethnicity"] = "asked-but-unknown"
    response = post(client, "enrollment", payload)
    assert response.status_code == 201, response.get_json()
    patient = produced(client, response.get_json(), "Patient")[0]
    by_url = {e["url"]: e["extension"] for e in patient["extension"]}
    race = by_url[US_CORE + "us-core-race"]
    assert [e["valueCoding"]["code"] for e in race if e["url"] == "ombCategory"] == ["2106-3", "2028-9"]
    assert race[-1] == {"url": "text", "valueString": "White, Asian"}
    ethnicity = by_url[US_CORE + "us-core-ethnicity"]
    assert ethnicity[0]["valueCoding"]["system"] == "http://terminology.hl7.org/CodeSystem/v3-NullFlavor"
    assert ethnicity[0]["valueCoding"]["code"] == "ASKU"


@pytest.mark.parametrize(
    ("field", "value", "expression"),
    [
        ("race", ["black"], "patient.race[0]"),
        ("ethnicity", "latino", "patient.ethnicity"),
        ("preferred_language", "english", "patient.preferred_language"),
    ],
)
def test_a_demographic_code_outside_its_vocabulary_is_refused_naming_the_field(
    client: Any, field: str, value: Any, expression: str
) -> None:
    payload = contract("enrollment-demographics")
    payload["patient"][field] = value
    response = post(client, "enrollment", payload)
    assert response.status_code == 400
    issue = response.get_json()["issue"][0]
    assert (issue["code"], issue["expression"]) == ("code-invalid", [expression])
    assert client.get("/fhir/Patient?_summary=count").get_json()["total"] == 0


def test_the_primary_diagnosis_is_ranked_first_on_the_episode(client: Any, program: dict[str, Any]) -> None:
    episode = produced(client, program["enrollment"], "EpisodeOfCare")[0]
    conditions = {
        f"Condition/{c['id']}": c["code"]["coding"][0]["code"]
        for c in produced(client, program["enrollment"], "Condition")
    }
    ranked = {conditions[d["condition"]["reference"]]: d.get("rank") for d in episode["diagnosis"]}
    assert ranked == {"F10.20": 1, "F33.1": None}
    roles = {d["role"]["coding"][0]["code"] for d in episode["diagnosis"]}
    assert "billing" not in roles


def test_the_treatment_plan_addresses_the_enrollment_conditions(client: Any, program: dict[str, Any]) -> None:
    eid = program["enrollment_id"]
    plan = post(client, "treatment-plan", contract("treatment-plan", eid)).get_json()
    careplan = produced(client, plan, "CarePlan")[0]
    conditions = [f"Condition/{c['id']}" for c in produced(client, program["enrollment"], "Condition")]
    assert sorted(a["reference"] for a in careplan["addresses"]) == sorted(conditions)


def test_the_plan_a_discharge_completes_still_addresses_the_enrollment_conditions(
    client: Any, program: dict[str, Any]
) -> None:
    eid = program["enrollment_id"]
    plan = post(client, "treatment-plan", contract("treatment-plan", eid)).get_json()
    before = produced(client, plan, "CarePlan")[0]
    assert post(client, "discharge", contract("discharge", eid)).status_code == 201
    after = read(client, f"CarePlan/{before['id']}")
    assert after["status"] == "completed"
    assert after["addresses"] == before["addresses"] and after["addresses"]


def test_discharge_records_the_clinical_status_it_gives_and_its_retraction_restores_it(
    client: Any, program: dict[str, Any]
) -> None:
    eid = program["enrollment_id"]
    post(client, "treatment-plan", contract("treatment-plan", eid))
    payload = contract("discharge", eid)
    payload["diagnoses"] = [{"code": "F10.20", "clinical_status": "remission"}]
    response = post(client, "discharge", payload)
    assert response.status_code == 201, response.get_json()
    by_code = {c["code"]["coding"][0]["code"]: c for c in produced(client, program["enrollment"], "Condition")}
    alcohol, depression = by_code["F10.20"], by_code["F33.1"]
    assert alcohol["clinicalStatus"]["coding"] == [
        {
            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
            "code": "remission",
            "display": "Remission",
        }
    ]
    assert alcohol["abatementDateTime"] == "2026-03-27"
    assert depression["clinicalStatus"]["coding"][0]["code"] == "active" and "abatementDateTime" not in depression
    client.post(f"/iop/discharges/{response.get_json()['id']}/retract")
    restored = read(client, f"Condition/{alcohol['id']}")
    assert restored["clinicalStatus"]["coding"][0]["code"] == "active"
    assert "abatementDateTime" not in restored


def test_discharge_naming_a_diagnosis_the_enrollment_lacks_is_refused(client: Any, program: dict[str, Any]) -> None:
    payload = contract("discharge", program["enrollment_id"])
    payload["diagnoses"] = [{"code": "F11.20", "clinical_status": "remission"}]
    response = post(client, "discharge", payload)
    assert response.status_code == 422
    assert response.get_json()["issue"][0]["expression"] == ["diagnoses[0].code"]


def test_every_resource_of_the_contract_records_is_valid_against_its_us_core_and_project_profiles(
    client: Any, program: dict[str, Any]
) -> None:
    eid = program["enrollment_id"]
    records = [program["enrollment"]]
    for kind in ("assessment", "treatment-plan", "session", "consent", "discharge"):
        response = post(client, kind, contract(kind, eid))
        assert response.status_code == 201, response.get_json()
        records.append(response.get_json())
    checked = set()
    for record in records:
        for reference in record["fhir"]:
            resource = read(client, reference)
            for url in resource["meta"]["profile"]:
                query = f"?profile={quote(url, safe='')}"
                response = client.post(
                    f"/fhir/{resource['resourceType']}/$validate{query}", json=resource, headers={"Content-Type": FHIR}
                )
                assert errors(response.get_json()) == [], (reference, url)
                if url.startswith(US_CORE):
                    checked.add(url.removeprefix(US_CORE))
    assert {
        "us-core-patient",
        "us-core-condition-problems-health-concerns",
        "us-core-observation-screening-assessment",
        "us-core-careplan",
        "us-core-careteam",
        "us-core-goal",
        "us-core-practitioner",
        "us-core-encounter",
        "us-core-observation-lab",
        "us-core-servicerequest",
        "us-core-provenance",
        "us-core-relatedperson",
    } <= checked
