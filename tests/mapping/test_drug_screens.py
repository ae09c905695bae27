"""Every drug screen the vocabulary admits can be recorded: each specimen x analyte, qualitative or measured, maps to
a drug screen Observation that conforms to its profile and maps back; the code is a verified LOINC code where
TERMINOLOGY.md §3.8 has one and a project code (named as such) otherwise. A positive result that a medication the
patient is recorded as taking explains is Expected (rule expected-positives). No app: the engine alone."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import EXAMPLES

from iop_fhir.mapping import load_engine
from iop_fhir.mapping.engine import Engine
from iop_fhir.mapping.terminology import Terminology
from iop_fhir.r4.profiles import ProfileRegistry

REPO = Path(__file__).resolve().parents[2]
ENROLLMENT_ID = "6f1c2d9e-0000-4000-8000-000000000001"
LOINC = "http://loinc.org"
PROJECT = "https://iop-fhir.org/fhir/CodeSystem/drug-screen-test"
LOCAL = "https://iop-fhir.org/fhir/CodeSystem/iop-concepts"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
EXPLAINED_BY = "https://iop-fhir.org/fhir/StructureDefinition/explained-by-medication"
TERMINOLOGY = Terminology.load(REPO / "mappings" / "terminology")
SPECIMENS = TERMINOLOGY.codes("specimen")
ANALYTES = TERMINOLOGY.codes("analyte")
# TERMINOLOGY.md §3.8: the verified codes the combinations must use (analyte, specimen, measured) -> LOINC.
VERIFIED = {
    ("amphetamines", "urine", False): "19261-7",
    ("methamphetamine", "urine", False): "19554-5",
    ("mdma", "urine", False): "19568-5",
    ("barbiturates", "urine", False): "19270-8",
    ("benzodiazepines", "urine", False): "14316-4",
    ("buprenorphine", "urine", False): "93494-3",
    ("cannabinoids", "urine", False): "18282-4",
    ("cocaine", "urine", False): "14314-9",
    ("fentanyl", "urine", False): "59673-4",
    ("methadone", "urine", False): "19550-3",
    ("eddp", "urine", False): "93495-0",
    ("opiates", "urine", False): "19295-5",
    ("6-mam", "urine", False): "19321-9",
    ("pcp", "urine", False): "19659-2",
    ("tramadol", "urine", False): "19710-3",
    ("xylazine", "urine", False): "101809-2",
    ("ethanol", "urine", False): "42242-8",
    ("ethyl-glucuronide", "urine", False): "58375-7",
    ("ethyl-glucuronide", "urine", True): "45324-1",
    ("ethanol", "blood", True): "56478-1",
}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return load_engine(REPO / "mappings")


@pytest.fixture(scope="module")
def profiles() -> ProfileRegistry:
    return ProfileRegistry.load(REPO / "profiles", REPO / "mappings" / "terminology")


def _session(specimen: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    text = (EXAMPLES.parent / "contract" / "session.json").read_text(encoding="utf-8")
    session: dict[str, Any] = json.loads(text.replace("{{enrollment_id}}", ENROLLMENT_ID))
    session["drug_screen"] = {"specimen": specimen, "collected_at": "2026-01-07T18:05:00-05:00", "results": results}
    return session


def _observations(engine: Engine, record: dict[str, Any], context: dict[str, Any] | None = None) -> list[Any]:
    derived = engine.prepare("session", record, context or {})
    produced = engine.map("session", derived.record, engine.natural_key("session", derived.record), context or {})
    return [p for p in produced if p.role == "drug-screen"]


def test_the_vocabulary_admits_four_specimens_and_nineteen_analytes() -> None:
    assert SPECIMENS == ["urine", "oral-fluid", "blood", "breath"]
    assert len(ANALYTES) == 19


@pytest.mark.parametrize("measured", [False, True], ids=["qualitative", "measured"])
@pytest.mark.parametrize("specimen", SPECIMENS)
@pytest.mark.parametrize("analyte", ANALYTES)
def test_every_specimen_and_analyte_maps_to_a_conforming_observation_and_back(
    engine: Engine, profiles: ProfileRegistry, analyte: str, specimen: str, measured: bool
) -> None:
    result: dict[str, Any] = {"analyte": analyte, "result": "positive"}
    if measured:
        result.update(value=0.04, unit="g/dL")
    record = _session(specimen, [result])
    (observation,) = _observations(engine, record)
    resource = observation.resource
    (coding,) = resource["code"]["coding"]
    expected = VERIFIED.get((analyte, specimen, measured))
    if expected is not None:
        assert (coding["system"], coding["code"]) == (LOINC, expected)
    elif (analyte, specimen, measured) == ("oxycodone", "urine", False):
        assert (coding["system"], coding["code"]) == (LOCAL, "analyte-oxycodone")
    else:
        assert coding["system"] == PROJECT
        assert "project code" in coding["display"]
    if measured:
        assert resource["valueQuantity"] == {
            "value": 0.04,
            "unit": "g/dL",
            "system": "http://unitsofmeasure.org",
            "code": "g/dL",
        }
        assert "valueCodeableConcept" not in resource
    else:
        assert resource["valueCodeableConcept"]["coding"][0]["code"] == "POS"
        assert "valueQuantity" not in resource
    assert resource["interpretation"][0]["coding"][0]["code"] == "POS"
    assert [i for i in profiles.claimed_issues(resource) if i.severity == "error"] == []
    back = engine.reverse("session", [("drug-screen", resource)])
    assert back["drug_screen"]["results"] == [result]


def test_every_project_test_code_says_why_it_is_not_loinc() -> None:
    codesystem = json.loads((REPO / "mappings" / "terminology" / "CodeSystem-drug-screen-test.json").read_text())
    for concept in codesystem["concept"]:
        assert "(iop-fhir project code)" in concept["display"], concept["code"]
        assert re.search(r"Project code: TERMINOLOGY\.md §3\.8 verifies", concept["definition"]), concept["code"]


def test_breath_alcohol_carries_its_quantity_and_the_result_as_interpretation(engine: Engine) -> None:
    record = _session("breath", [{"analyte": "ethanol", "result": "negative", "value": 0.0, "unit": "g/dL"}])
    (observation,) = _observations(engine, record)
    resource = observation.resource
    assert resource["valueQuantity"]["value"] == 0.0
    assert resource["interpretation"] == [
        {"coding": [{"system": INTERPRETATION, "code": "NEG", "display": "Negative"}]}
    ]


def test_the_group_session_contract_screens_map(engine: Engine) -> None:
    """The oral-fluid and breath screens of the group-session contract, as each attendee's session maps them."""
    group = json.loads((EXAMPLES.parent / "contract" / "group-session.json").read_text(encoding="utf-8"))
    for attendee in group["attendees"]:
        if "drug_screen" not in attendee:
            continue
        record = _session(attendee["drug_screen"]["specimen"], attendee["drug_screen"]["results"])
        assert len(_observations(engine, record)) == len(attendee["drug_screen"]["results"])


# -- expected positives -----------------------------------------------------------------------------------------


def _medication(medication: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": f"med-{medication}",
        "medication": medication,
        "status": "active",
        "start": "2026-01-05",
        "end": None,
        "source": "prescribed-by-program",
        "explains": TERMINOLOGY.property_values("medication", medication, "explains"),
        **fields,
    }


BUPRENORPHINE_SCREEN = [
    {"analyte": "buprenorphine", "result": "positive"},
    {"analyte": "fentanyl", "result": "positive"},
]


def _expected(observation: Any) -> tuple[bool, list[Any], list[Any]]:
    resource = observation.resource
    codes = [c["code"] for concept in resource["interpretation"] for c in concept["coding"]]
    extensions = [e for e in resource.get("extension", []) if e["url"] == EXPLAINED_BY]
    return "EXP" in codes, extensions, resource.get("note", [])


def test_buprenorphine_positive_of_a_patient_on_buprenorphine_naloxone_is_expected(engine: Engine) -> None:
    context = {"medications": [_medication("sertraline"), _medication("buprenorphine-naloxone")]}
    derived = engine.prepare("session", _session("urine", copy.deepcopy(BUPRENORPHINE_SCREEN)), context)
    assert derived.record["drug_screen"]["results"] == BUPRENORPHINE_SCREEN  # the record is as sent
    (warning,) = derived.warnings
    assert (warning.code, warning.severity, warning.expression) == (
        "informational",
        "information",
        "drug_screen.results[0]",
    )
    assert "buprenorphine-naloxone (medication med-buprenorphine-naloxone)" in warning.diagnostics
    assert "not a relapse signal" in warning.diagnostics
    buprenorphine, fentanyl = _observations(engine, _session("urine", BUPRENORPHINE_SCREEN), context)
    expected, extensions, notes = _expected(buprenorphine)
    assert expected
    assert extensions[0]["valueCodeableConcept"]["coding"][0]["code"] == "buprenorphine-naloxone"
    assert "buprenorphine-naloxone" in notes[0]["text"] and "not a sign of relapse" in notes[0]["text"]
    # fentanyl is no medication of the patient's: not expected, nothing added
    assert _expected(fentanyl) == (False, [], [])
    # the resources still give the record back
    back = engine.reverse("session", [("drug-screen", buprenorphine.resource), ("drug-screen", fentanyl.resource)])
    assert back["drug_screen"]["results"] == BUPRENORPHINE_SCREEN


def test_buprenorphine_positive_of_a_patient_not_on_buprenorphine_is_not_expected(engine: Engine) -> None:
    context = {"medications": [_medication("naltrexone"), _medication("sertraline")]}
    derived = engine.prepare("session", _session("urine", copy.deepcopy(BUPRENORPHINE_SCREEN)), context)
    assert derived.warnings == []
    for observation in _observations(engine, _session("urine", BUPRENORPHINE_SCREEN), context):
        assert _expected(observation) == (False, [], [])
    for observation in _observations(engine, _session("urine", BUPRENORPHINE_SCREEN)):  # no context at all
        assert _expected(observation) == (False, [], [])


@pytest.mark.parametrize(
    ("fields", "explained"),
    [
        ({}, True),
        ({"start": "2026-01-08"}, False),  # started after the collection
        ({"status": "stopped", "end": "2026-01-06"}, False),  # ended before it
        ({"status": "stopped", "end": "2026-01-07"}, True),  # ended that day
        ({"status": "completed"}, False),  # no longer taken, no end to tell when
        ({"status": "on-hold"}, False),
    ],
)
def test_a_medication_explains_a_positive_only_while_it_covers_the_collection_day(
    engine: Engine, fields: dict[str, Any], explained: bool
) -> None:
    context = {"medications": [_medication("methadone", **fields)]}
    record = _session("oral-fluid", [{"analyte": "eddp", "result": "positive"}])
    assert len(engine.prepare("session", record, context).warnings) == explained
    (observation,) = _observations(engine, record, context)
    assert _expected(observation)[0] == explained


def test_negative_results_are_never_expected(engine: Engine) -> None:
    context = {"medications": [_medication("buprenorphine")]}
    record = _session("urine", [{"analyte": "buprenorphine", "result": "negative"}])
    assert engine.prepare("session", record, context).warnings == []
    (observation,) = _observations(engine, record, context)
    assert _expected(observation) == (False, [], [])


def test_the_analytes_each_medication_explains_are_codes_of_the_analyte_vocabulary() -> None:
    explaining = {}
    for medication in TERMINOLOGY.codes("medication"):
        explains = TERMINOLOGY.property_values("medication", medication, "explains")
        assert set(explains) <= set(ANALYTES), medication
        if explains:
            explaining[medication] = explains
    assert explaining["buprenorphine-naloxone"] == ["buprenorphine"]
    assert explaining["methadone"] == ["methadone", "eddp"]
    assert "naltrexone" not in explaining and "naloxone-nasal-spray" not in explaining
