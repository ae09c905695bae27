"""Every medication record the vocabularies admit can be recorded: each medication, source, status, form and category
maps to the resource its source calls for, conforming to its profiles and mapping back. No app: the engine alone."""

from __future__ import annotations

import json
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
TERMINOLOGY = Terminology.load(REPO / "mappings" / "terminology")
RESOURCE_OF_SOURCE = {
    "prescribed-by-program": "MedicationRequest",
    "prescribed-elsewhere": "MedicationStatement",
    "reported-by-patient": "MedicationStatement",
    "dispensed-by-program": "MedicationDispense",
}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return load_engine(REPO / "mappings")


@pytest.fixture(scope="module")
def profiles() -> ProfileRegistry:
    return ProfileRegistry.load(REPO / "profiles", REPO / "mappings" / "terminology")


def _record(source: str, **fields: Any) -> dict[str, Any]:
    text = (EXAMPLES.parent / "contract" / "medication.json").read_text(encoding="utf-8")
    record: dict[str, Any] = json.loads(text.replace("{{enrollment_id}}", ENROLLMENT_ID))
    record["source"] = source
    if source == "dispensed-by-program":  # a dispense names no prescriber and has no reason (medication.yaml)
        del record["prescriber"], record["indication"]
        record["quantity"] = 2
    return record | fields


def _medication_resource(engine: Engine, record: dict[str, Any]) -> dict[str, Any]:
    derived = engine.prepare("medication", record, {})
    produced = engine.map("medication", derived.record, engine.natural_key("medication", derived.record))
    (resource,) = [p.resource for p in produced if p.role != "prescriber"]
    return resource


def test_every_source_of_the_vocabulary_has_its_resource_type() -> None:
    assert TERMINOLOGY.codes("medication-source") == list(RESOURCE_OF_SOURCE)


@pytest.mark.parametrize("source", list(RESOURCE_OF_SOURCE))
@pytest.mark.parametrize("medication", TERMINOLOGY.codes("medication"))
def test_every_medication_of_every_source_maps_to_a_conforming_resource_and_back(
    engine: Engine, profiles: ProfileRegistry, medication: str, source: str
) -> None:
    record = _record(source, medication=medication)
    resource = _medication_resource(engine, record)
    assert resource["resourceType"] == RESOURCE_OF_SOURCE[source]
    (coding,) = resource["medicationCodeableConcept"]["coding"]
    assert (coding["system"], coding["code"]) == ("https://iop-fhir.org/fhir/CodeSystem/iop-medication", medication)
    assert [i for i in profiles.claimed_issues(resource) if i.severity == "error"] == []
    role = {"MedicationRequest": "request", "MedicationStatement": "statement", "MedicationDispense": "dispense"}
    back = engine.reverse("medication", [(role[resource["resourceType"]], resource)])
    assert {k: back[k] for k in ("medication", "source", "status", "category", "start")} == {
        k: record[k] for k in ("medication", "source", "status", "category", "start")
    }


@pytest.mark.parametrize("source", list(RESOURCE_OF_SOURCE))
@pytest.mark.parametrize(
    ("vocabulary", "field"),
    [("medication-status", "status"), ("medication-form", "form"), ("medication-category", "category")],
)
def test_every_status_form_and_category_maps_for_every_source(
    engine: Engine, profiles: ProfileRegistry, source: str, vocabulary: str, field: str
) -> None:
    for code in TERMINOLOGY.codes(vocabulary):
        resource = _medication_resource(engine, _record(source, **{field: code}))
        assert [i for i in profiles.claimed_issues(resource) if i.severity == "error"] == [], (code, resource)


@pytest.mark.parametrize(
    ("source", "status"),
    [("dispensed-by-program", "in-progress"), ("prescribed-by-program", "active"), ("reported-by-patient", "active")],
)
def test_an_active_record_is_an_in_progress_dispense_and_an_active_request_or_statement(
    engine: Engine, source: str, status: str
) -> None:
    assert _medication_resource(engine, _record(source, status="active"))["status"] == status
