"""/iop/medications end to end on both databases: the contract payloads in as they are, MedicationRequest /
MedicationStatement / MedicationDispense out by source, PUT and retract, bad input refused naming the field; and a
drug screen of a patient on a medication that explains a positive result (expected, not a relapse signal)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

CONTRACT = Path(__file__).resolve().parents[2].parent / "shared" / "contract"
PROFILE = "https://iop-fhir.org/fhir/StructureDefinition/"
US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition/"
EXPLAINED_BY = PROFILE + "explained-by-medication"
PART2 = {
    ("http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "R"),
    ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "42CFRPart2"),
}


def contract(name: str, enrollment_id: str) -> dict[str, Any]:
    text = (CONTRACT / f"{name}.json").read_text(encoding="utf-8").replace("{{enrollment_id}}", enrollment_id)
    payload: dict[str, Any] = json.loads(text)
    return payload


def read(client: Any, reference: str) -> dict[str, Any]:
    response = client.get(f"/fhir/{reference}")
    assert response.status_code == 200, reference
    body: dict[str, Any] = response.get_json()
    return body


def resources(client: Any, body: dict[str, Any], res_type: str) -> list[dict[str, Any]]:
    return [read(client, ref) for ref in body["fhir"] if ref.startswith(f"{res_type}/")]


def expression(response: Any) -> tuple[int, str, list[str]]:
    issue = response.get_json()["issue"][0]
    return response.status_code, issue["code"], issue.get("expression")


def _enroll(client: Any, mrn: str) -> str:
    payload = json.loads((CONTRACT / "enrollment.json").read_text(encoding="utf-8"))
    payload["patient"]["identifiers"][0]["value"] = mrn
    response = client.post("/iop/enrollments", json=payload)
    assert response.status_code == 201, response.get_json()
    enrollment_id: str = response.get_json()["id"]
    return enrollment_id


@pytest.fixture
def enrollment_id(client: Any) -> str:
    return _enroll(client, "MRN-448812")


# -- the contracts ------------------------------------------------------------------------------------------------


def test_prescription_contract_is_accepted_as_it_is_and_is_a_us_core_shaped_medication_request(
    client: Any, enrollment_id: str
) -> None:
    payload = contract("medication", enrollment_id)
    response = client.post("/iop/medications", json=payload)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert response.headers["Location"].endswith(f"/iop/medications/{body['id']}")
    assert {k: body[k] for k in payload} == payload
    (request,) = resources(client, body, "MedicationRequest")
    assert resources(client, body, "MedicationStatement") == resources(client, body, "MedicationDispense") == []
    assert request["meta"]["profile"] == [PROFILE + "iop-medication-request", US_CORE + "us-core-medicationrequest"]
    assert PART2 <= {(s["system"], s["code"]) for s in request["meta"]["security"]}
    assert (request["status"], request["intent"], request["authoredOn"]) == ("active", "order", "2026-01-05")
    assert request["medicationCodeableConcept"]["coding"][0]["code"] == "buprenorphine-naloxone"
    assert request["reasonCode"][0]["coding"][0] == {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "F11.20"}
    assert request["dosageInstruction"][0]["timing"]["repeat"]["periodUnit"] == "d"
    assert request["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"] == {"value": 1, "unit": "film"}
    extensions = {e["url"].rsplit("/", 1)[1]: e for e in request["extension"]}
    assert extensions["medication-strength"]["valueString"] == "8 mg / 2 mg"
    assert extensions["medication-source"]["valueCoding"]["code"] == "prescribed-by-program"
    (prescriber,) = resources(client, body, "Practitioner")
    assert request["requester"]["reference"] == f"Practitioner/{prescriber['id']}"
    assert prescriber["identifier"][0] == {"system": "http://hl7.org/fhir/sid/us-npi", "value": "1245319599"}
    patient = read(client, request["subject"]["reference"])
    assert patient["resourceType"] == "Patient"
    found = client.get("/fhir/MedicationRequest", query_string={"subject": request["subject"]["reference"]})
    assert found.get_json()["total"] == 1


def test_naloxone_kit_contract_is_accepted_as_it_is_and_is_a_medication_dispense(
    client: Any, enrollment_id: str
) -> None:
    payload = contract("medication-naloxone", enrollment_id)
    response = client.post("/iop/medications", json=payload)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert {k: body[k] for k in payload} == payload
    (dispense,) = resources(client, body, "MedicationDispense")
    assert dispense["meta"]["profile"] == [PROFILE + "iop-medication-dispense", US_CORE + "us-core-medicationdispense"]
    assert (dispense["status"], dispense["whenHandedOver"], dispense["quantity"]) == (
        "completed",
        "2026-01-12",
        {"value": 2},
    )
    assert dispense["medicationCodeableConcept"]["coding"][0]["code"] == "naloxone-nasal-spray"
    assert dispense["category"]["coding"][0]["code"] == "overdose-reversal"
    assert read(client, dispense["context"]["reference"])["resourceType"] == "EpisodeOfCare"


@pytest.mark.parametrize("source", ["prescribed-elsewhere", "reported-by-patient"])
def test_a_medication_the_program_did_not_prescribe_is_a_medication_statement(
    client: Any, enrollment_id: str, source: str
) -> None:
    payload = contract("medication", enrollment_id) | {"medication": "methadone", "source": source}
    del payload["strength"], payload["form"]
    body = client.post("/iop/medications", json=payload).get_json()
    (statement,) = resources(client, body, "MedicationStatement")
    assert resources(client, body, "MedicationRequest") == []
    assert statement["meta"]["profile"] == [PROFILE + "iop-medication-statement"]
    assert statement["effectivePeriod"] == {"start": "2026-01-05"}
    assert statement["informationSource"]["reference"].startswith("Practitioner/")
    assert statement["dosage"][0]["doseAndRate"][0]["doseQuantity"]["unit"] == "film"


# -- read, list, replace, retract ---------------------------------------------------------------------------------


def test_medication_is_read_listed_replaced_and_retracted(client: Any, enrollment_id: str) -> None:
    created = client.post("/iop/medications", json=contract("medication", enrollment_id)).get_json()
    rid = created["id"]
    assert client.get(f"/iop/medications/{rid}").get_json()["medication"] == "buprenorphine-naloxone"
    listed = client.get("/iop/medications", query_string={"enrollment": enrollment_id}).get_json()
    assert [item["id"] for item in listed["items"]] == [rid]
    stopped = client.get(f"/iop/medications/{rid}").get_json() | {"status": "stopped", "end": "2026-02-01"}
    response = client.put(f"/iop/medications/{rid}", json=stopped)
    assert response.status_code == 200, response.get_json()
    (request,) = resources(client, response.get_json(), "MedicationRequest")
    assert request["status"] == "stopped"
    assert request["dosageInstruction"][0]["timing"]["repeat"]["boundsPeriod"] == {
        "start": "2026-01-05",
        "end": "2026-02-01",
    }
    retracted = client.post(f"/iop/medications/{rid}/retract", json={"reason": "wrong patient"})
    assert retracted.status_code == 200
    assert retracted.get_json()["meta"]["status"] == "entered-in-error"
    assert read(client, f"MedicationRequest/{request['id']}")["status"] == "entered-in-error"


# -- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "status", "code", "field"),
    [
        ({"medication": "unobtainium"}, 400, "code-invalid", "medication"),
        ({"source": "found-on-the-street"}, 400, "code-invalid", "source"),
        ({"status": "draft"}, 400, "code-invalid", "status"),
        ({"end": "2026-01-01"}, 400, "invariant", "end"),
        ({"start": "2026-13-01"}, 400, "value", "start"),
        ({"indication": {"system": "icd-10-cm", "code": "F11"}}, 400, "code-invalid", "indication.code"),
        ({"dose": {"quantity": 1, "unit": "film", "frequency": 1, "period": 1}}, 400, "required", "dose.period_unit"),
        ({"prescriber": {"name": "X", "npi": "1245319598"}}, 400, "value", "prescriber.npi"),
        ({"source": "dispensed-by-program"}, 400, "invariant", "prescriber"),
        ({"quantity": 0}, 400, "value", "quantity"),
        ({"colour": "blue"}, 400, "structure", "colour"),
        ({"enrollment_id": "00000000-0000-4000-8000-000000000000"}, 422, "not-found", "enrollment_id"),
    ],
)
def test_bad_medication_is_refused_naming_the_field_and_stores_nothing(
    client: Any, enrollment_id: str, change: dict[str, Any], status: int, code: str, field: str
) -> None:
    payload = contract("medication", enrollment_id) | change
    response = client.post("/iop/medications", json=payload)
    assert expression(response) == (status, code, [field]), response.get_json()
    assert client.get("/iop/medications").get_json()["total"] == 0


def test_indication_of_a_dispense_is_refused_rather_than_dropped(client: Any, enrollment_id: str) -> None:
    payload = contract("medication-naloxone", enrollment_id) | {"indication": {"system": "icd-10-cm", "code": "F11.20"}}
    response = client.post("/iop/medications", json=payload)
    assert expression(response) == (400, "invariant", ["indication"])
    assert "MedicationDispense has no reason" in response.get_json()["issue"][0]["diagnostics"]


# -- drug screens: every specimen, measured results, expected positives --------------------------------------------


def _session(enrollment_id: str, specimen: str, results: list[dict[str, Any]], day: str = "07") -> dict[str, Any]:
    session = contract("session", enrollment_id)
    del session["facilitator"]  # the Practitioner is not what these tests are about
    session["start"], session["end"] = f"2026-01-{day}T18:00:00-05:00", f"2026-01-{day}T21:00:00-05:00"
    session["drug_screen"] = {"specimen": specimen, "collected_at": f"2026-01-{day}T18:05:00-05:00", "results": results}
    return session


@pytest.mark.parametrize("specimen", ["urine", "oral-fluid", "blood", "breath"])
def test_a_session_screening_every_analyte_of_any_specimen_is_recorded(
    client: Any, enrollment_id: str, specimen: str
) -> None:
    analytes = [c["code"] for c in json.loads(_terminology("CodeSystem-iop-analyte.json"))["concept"]]
    results = [{"analyte": a, "result": "negative"} for a in analytes]
    results[0] |= {"value": 0.0, "unit": "g/dL"}
    response = client.post("/iop/sessions", json=_session(enrollment_id, specimen, results))
    assert response.status_code == 201, response.get_json()
    observations = [o for o in resources(client, response.get_json(), "Observation") if "specimen" in o]
    assert len(observations) == len(analytes)
    assert sum("valueQuantity" in o for o in observations) == 1


def _terminology(name: str) -> str:
    return (Path(__file__).resolve().parents[2] / "mappings" / "terminology" / name).read_text(encoding="utf-8")


def test_breath_alcohol_of_the_group_contract_is_recorded_with_its_value(client: Any, enrollment_id: str) -> None:
    results = [{"analyte": "ethanol", "result": "negative", "value": 0.0, "unit": "g/dL"}]
    body = client.post("/iop/sessions", json=_session(enrollment_id, "breath", results)).get_json()
    (observation,) = [o for o in resources(client, body, "Observation") if "specimen" in o]
    assert observation["valueQuantity"] == {
        "value": 0.0,
        "unit": "g/dL",
        "system": "http://unitsofmeasure.org",
        "code": "g/dL",
    }
    assert observation["interpretation"][0]["coding"][0]["code"] == "NEG"
    assert body["drug_screen"]["results"] == results


@pytest.mark.parametrize(
    ("result", "field"),
    [
        ({"analyte": "ethanol", "result": "negative", "value": 0.02}, "drug_screen.results[0].unit"),
        ({"analyte": "ethanol", "result": "negative", "unit": "g/dL"}, "drug_screen.results[0].value"),
        ({"analyte": "ethanol", "result": "negative", "value": 0.02, "unit": "%"}, "drug_screen.results[0].unit"),
        ({"analyte": "ethanol", "result": "negative", "value": -1, "unit": "g/dL"}, "drug_screen.results[0].value"),
    ],
)
def test_a_measured_result_needs_a_known_unit_and_a_value(
    client: Any, enrollment_id: str, result: dict[str, Any], field: str
) -> None:
    response = client.post("/iop/sessions", json=_session(enrollment_id, "breath", [result]))
    assert response.status_code == 400
    assert response.get_json()["issue"][0]["expression"] == [field]


def _buprenorphine_screen(client: Any, enrollment_id: str, day: str = "12") -> dict[str, Any]:
    results = [{"analyte": "buprenorphine", "result": "positive"}, {"analyte": "fentanyl", "result": "positive"}]
    response = client.post("/iop/sessions", json=_session(enrollment_id, "urine", results, day))
    assert response.status_code == 201, response.get_json()
    body: dict[str, Any] = response.get_json()
    return body


def _observation(client: Any, body: dict[str, Any], loinc: str) -> dict[str, Any]:
    return next(o for o in resources(client, body, "Observation") if o["code"]["coding"][0]["code"] == loinc)


def test_buprenorphine_positive_of_a_patient_on_buprenorphine_is_expected_and_said_so(
    client: Any, enrollment_id: str
) -> None:
    medication = client.post("/iop/medications", json=contract("medication", enrollment_id)).get_json()
    body = _buprenorphine_screen(client, enrollment_id)
    (warning,) = body["warnings"]
    assert (warning["severity"], warning["code"], warning["expression"]) == (
        "information",
        "informational",
        ["drug_screen.results[0]"],
    )
    assert f"buprenorphine-naloxone (medication {medication['id']})" in warning["diagnostics"]
    assert body["drug_screen"]["results"][0] == {"analyte": "buprenorphine", "result": "positive"}
    buprenorphine = _observation(client, body, "93494-3")
    assert [c["code"] for i in buprenorphine["interpretation"] for c in i["coding"]] == ["POS", "EXP"]
    (extension,) = [e for e in buprenorphine["extension"] if e["url"] == EXPLAINED_BY]
    assert extension["valueCodeableConcept"]["coding"][0]["code"] == "buprenorphine-naloxone"
    assert "not a sign of relapse" in buprenorphine["note"][0]["text"]
    fentanyl = _observation(client, body, "59673-4")
    assert [c["code"] for i in fentanyl["interpretation"] for c in i["coding"]] == ["POS"]
    assert "extension" not in fentanyl and "note" not in fentanyl
    # The record read back is the record sent: a client may PUT it as it is.
    again = client.put(f"/iop/sessions/{body['id']}", json=client.get(f"/iop/sessions/{body['id']}").get_json())
    assert again.status_code == 200, again.get_json()
    assert [w["expression"] for w in again.get_json()["warnings"]] == [["drug_screen.results[0]"]]


def test_buprenorphine_positive_of_a_patient_not_on_buprenorphine_is_not_expected(
    client: Any, enrollment_id: str
) -> None:
    other = _enroll(client, "MRN-000777")
    client.post("/iop/medications", json=contract("medication", other))  # another patient's buprenorphine
    naloxone = client.post("/iop/medications", json=contract("medication-naloxone", enrollment_id))
    assert naloxone.status_code == 201  # a naloxone kit explains nothing
    body = _buprenorphine_screen(client, enrollment_id)
    assert "warnings" not in body
    buprenorphine = _observation(client, body, "93494-3")
    assert [c["code"] for i in buprenorphine["interpretation"] for c in i["coding"]] == ["POS"]
    assert "extension" not in buprenorphine


def test_a_retracted_or_later_medication_explains_nothing(client: Any, enrollment_id: str) -> None:
    later = contract("medication", enrollment_id) | {"start": "2026-01-20"}
    assert client.post("/iop/medications", json=later).status_code == 201
    retracted = client.post("/iop/medications", json=contract("medication", enrollment_id)).get_json()
    client.post(f"/iop/medications/{retracted['id']}/retract")
    body = _buprenorphine_screen(client, enrollment_id)
    assert "warnings" not in body


def test_put_of_a_session_reinterprets_it_against_the_medications_of_now(client: Any, enrollment_id: str) -> None:
    body = _buprenorphine_screen(client, enrollment_id)
    assert "warnings" not in body
    client.post("/iop/medications", json=contract("medication", enrollment_id))
    # A replay is the same record: nothing changes, not even its interpretation.
    replay = client.post("/iop/sessions", json=_session(enrollment_id, "urine", body["drug_screen"]["results"], "12"))
    assert replay.status_code == 200
    assert "EXP" not in json.dumps(_observation(client, body, "93494-3")["interpretation"])
    updated = client.put(f"/iop/sessions/{body['id']}", json=copy.deepcopy(body)).get_json()
    assert [w["expression"] for w in updated["warnings"]] == [["drug_screen.results[0]"]]
    buprenorphine = _observation(client, updated, "93494-3")
    assert [c["code"] for i in buprenorphine["interpretation"] for c in i["coding"]] == ["POS", "EXP"]


def test_an_attendee_of_a_group_session_on_buprenorphine_has_an_expected_positive(
    client: Any, enrollment_id: str
) -> None:
    others = [_enroll(client, "MRN-000778"), _enroll(client, "MRN-000779")]
    client.post("/iop/medications", json=contract("medication", enrollment_id))
    text = (CONTRACT / "group-session.json").read_text(encoding="utf-8").replace("{{enrollment_id}}", enrollment_id)
    text = text.replace("{{enrollment_id_2}}", others[0]).replace("{{enrollment_id_3}}", others[1])
    group = json.loads(text)
    del group["facilitator"]
    response = client.post("/iop/group-sessions", json=group)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    (warning,) = body["warnings"]
    assert warning["severity"] == "information"
    assert warning["expression"] == ["attendees[0].drug_screen.results[1]"]
    observations = [o for o in resources(client, body, "Observation") if "specimen" in o]
    buprenorphine = next(o for o in observations if o["code"]["coding"][0]["code"] == "oral-fluid-buprenorphine")
    assert [c["code"] for i in buprenorphine["interpretation"] for c in i["coding"]] == ["POS", "EXP"]
    breath = next(o for o in observations if o["code"]["coding"][0]["code"] == "breath-ethanol")
    assert breath["valueQuantity"]["value"] == 0.0
