"""Search index extraction (iop_fhir/r4/indexing.py) on real US Core and Synthea resources, the value rules
of https://hl7.org/fhir/R4/search.html, and agreement of the fast path with fhirpathpy."""

from __future__ import annotations

import json
import os
import statistics
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from iop_fhir.r4 import definitions, indexing
from iop_fhir.r4.indexing import (
    DATE_MAX,
    DATE_MIN,
    NUMBER_MAX,
    date_range,
    extract,
    extract_with_fhirpathpy,
    indexed_params,
    normalize_string,
    number_range,
    split_reference,
)
from iop_fhir.store import schema

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "fhir-examples"
if not EXAMPLES.exists():
    EXAMPLES = Path(os.environ.get("IOP_FHIR_EXAMPLES", "../shared/fhir-examples")).resolve()
US_CORE = EXAMPLES / "us-core"
SYNTHEA = EXAMPLES / "synthea-10-patients"


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((US_CORE / name).read_text())
    return data


def _synthea(res_type: str, index: int = 0) -> dict[str, Any]:
    with (SYNTHEA / f"{res_type}.000.ndjson").open() as f:
        for i, line in enumerate(f):
            if i == index:
                data: dict[str, Any] = json.loads(line)
                return data
    raise IndexError(index)


def _us(iso: str) -> int:
    """Microseconds since the epoch of an ISO instant, computed by the standard library."""
    return (datetime.fromisoformat(iso) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def _rows(resource: dict[str, Any], kind: str, param: str) -> list[dict[str, Any]]:
    return [r for r in extract(resource)[kind] if r["param"] == param]


def _token(system: str | None, code: str | None, text: str | None, param: str) -> dict[str, Any]:
    return {"param": param, "system": system, "code": code, "text": text}


def _ref(target_type: str | None, target_id: str | None, url: str | None, param: str) -> dict[str, Any]:
    return {"param": param, "target_type": target_type, "target_id": target_id, "url": url}


def _strings(param: str, *exact: str) -> list[dict[str, Any]]:
    return [{"param": param, "norm": normalize_string(e), "exact": e} for e in exact]


# --- real resources -----------------------------------------------------------------------------------------


def test_phq9_panel_code_is_a_loinc_token_with_its_text_lower_cased() -> None:
    panel = _load("Observation-PHQ9-panel-example-44249-1.json")
    assert _rows(panel, "token", "code") == [
        _token("http://loinc.org", "44249-1", "phq-9 quick depression assessment panel [reported.phq]", "code")
    ]


def test_phq9_panel_subject_and_patient_refer_to_the_patient() -> None:
    panel = _load("Observation-PHQ9-panel-example-44249-1.json")
    assert _rows(panel, "reference", "subject") == [_ref("Patient", "example", None, "subject")]
    assert _rows(panel, "reference", "patient") == [_ref("Patient", "example", None, "patient")]
    assert _rows(panel, "reference", "performer") == [_ref("Practitioner", "practitioner-1", None, "performer")]
    members = _rows(panel, "reference", "has-member")
    assert len(members) == 11
    assert members[0] == _ref("Observation", "PHQ9-item-example-44250-9", None, "has-member")


def test_phq9_panel_date_is_its_microsecond_instant() -> None:
    panel = _load("Observation-PHQ9-panel-example-44249-1.json")  # effectiveDateTime 2022-11-29T20:50:32.718000Z
    instant = _us("2022-11-29T20:50:32.718000+00:00")
    assert _rows(panel, "date", "date") == [{"param": "date", "low": instant, "high": instant}]


def test_phq9_panel_profile_is_found_with_and_without_its_version() -> None:
    panel = _load("Observation-PHQ9-panel-example-44249-1.json")
    url = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-observation-screening-assessment"
    assert _rows(panel, "uri", "_profile") == [
        {"param": "_profile", "value": f"{url}|9.0.0"},
        {"param": "_profile", "value": url},
    ]


def test_phq9_item_value_concept_and_status_are_tokens() -> None:
    item = _load("Observation-PHQ9-item-example-44250-9.json")
    assert _rows(item, "token", "value-concept") == [
        _token("http://loinc.org", "LA6570-1", "more than half the days", "value-concept")
    ]
    assert _rows(item, "token", "status") == [_token(None, "final", None, "status")]
    # value-string is (value as string) | (value as CodeableConcept).text
    assert _rows(item, "string", "value-string") == _strings("value-string", "More than half the days")


def test_bmi_value_quantity_has_its_implicit_precision_and_ucum_code() -> None:
    bmi = _load("bmi.json")  # valueQuantity 16.2 kg/m2
    assert _rows(bmi, "quantity", "value-quantity") == [
        {
            "param": "value-quantity",
            "value": 16.2,
            "low": 16.15,
            "high": 16.25,
            "system": "http://unitsofmeasure.org",
            "code": "kg/m2",
            "unit": "kg/m2",
        }
    ]
    assert _rows(bmi, "date", "date") == [
        {
            "param": "date",
            "low": _us("1999-07-02T00:00:00+00:00"),
            "high": _us("1999-07-02T23:59:59.999999+00:00"),
        }
    ]


def test_component_value_quantity_indexes_every_component_even_without_a_system() -> None:
    average = _load("Observation-average-blood-pressure.json")
    rows = _rows(average, "quantity", "component-value-quantity")
    assert [(r["value"], r["low"], r["high"], r["system"], r["code"], r["unit"]) for r in rows] == [
        (109.0, 108.5, 109.5, "http://unitsofmeasure.org", "mm[Hg]", "mm[Hg]"),
        (72.0, 71.5, 72.5, "http://unitsofmeasure.org", "mm[Hg]", "mm[Hg]"),
        (3.0, 2.5, 3.5, None, None, "#"),
    ]
    assert _rows(average, "quantity", "value-quantity") == []
    # effectivePeriod with millisecond precision: from the first to the last microsecond of those milliseconds
    assert _rows(average, "date", "date") == [
        {
            "param": "date",
            "low": _us("2023-08-03T01:06:52.480000+00:00"),
            "high": _us("2023-08-06T13:07:01.166999+00:00"),
        }
    ]


def test_us_core_patient_names_identifier_birthdate_and_telecom() -> None:
    patient = _load("patient-example.json")
    assert _rows(patient, "string", "family") == _strings("family", "Shaw", "Baxter")
    assert _rows(patient, "string", "given") == _strings("given", "Amy", "V.")  # distinct strings only
    assert _rows(patient, "string", "name") == _strings("name", "Shaw", "Amy", "V.", "Baxter", "PharmD")
    assert _rows(patient, "token", "identifier") == [
        _token("http://example.org/patient/identifiers", "1032702", "medical record number", "identifier")
    ]
    assert _rows(patient, "date", "birthdate") == [
        {
            "param": "birthdate",
            "low": _us("1987-02-20T00:00:00+00:00"),
            "high": _us("1987-02-20T23:59:59.999999+00:00"),
        }
    ]
    assert _rows(patient, "token", "phone") == [_token(None, "555-555-5555", None, "phone")]
    assert _rows(patient, "token", "email") == [_token(None, "amy.shaw@example.com", None, "email")]
    assert _rows(patient, "token", "active") == [_token(None, "true", None, "active")]
    # Patient.deceased.exists() and Patient.deceased != false: false when absent
    assert _rows(patient, "token", "deceased") == [_token(None, "false", None, "deceased")]
    assert _rows(patient, "string", "address-postalcode") == _strings("address-postalcode", "74047", "74048")
    assert _rows(patient, "string", "address") == _strings(
        "address", "MOUNDS", "OK", "74047", "US", "49 MEADOW ST", "74048", "183 MOUNTAIN VIEW ST"
    )


def test_synthea_patient_gender_deceased_and_death_date() -> None:
    patient = _synthea("Patient")
    assert _rows(patient, "token", "gender") == [_token(None, "female", None, "gender")]
    assert _rows(patient, "token", "deceased") == [_token(None, "true", None, "deceased")]
    assert _rows(patient, "date", "death-date") == [  # 1989-05-09T20:35:22-04:00, second precision
        {
            "param": "death-date",
            "low": _us("1989-05-10T00:35:22+00:00"),
            "high": _us("1989-05-10T00:35:22.999999+00:00"),
        }
    ]
    assert _rows(patient, "date", "birthdate") == [
        {
            "param": "birthdate",
            "low": _us("1927-05-21T00:00:00+00:00"),
            "high": _us("1927-05-21T23:59:59.999999+00:00"),
        }
    ]
    assert _rows(patient, "string", "given") == _strings("given", "Sumiko254", "Larue605")
    assert _rows(patient, "token", "identifier")[2] == _token(
        "http://hl7.org/fhir/sid/us-ssn", "999-94-5397", "social security number", "identifier"
    )
    assert _rows(patient, "token", "language") == [
        _token("urn:ietf:bcp:47", "en-US", "english (united states)", "language")
    ]


def test_us_core_encounter_period_is_converted_to_utc() -> None:
    encounter = _load("encounter-example-1.json")  # 2015-11-01T17:00:14-05:00 .. 2015-11-01T18:00:14-05:00
    assert _rows(encounter, "date", "date") == [
        {
            "param": "date",
            "low": _us("2015-11-01T22:00:14+00:00"),
            "high": _us("2015-11-01T23:00:14.999999+00:00"),
        }
    ]
    assert _rows(encounter, "token", "class") == [
        _token("http://terminology.hl7.org/CodeSystem/v3-ActCode", "AMB", "ambulatory", "class")
    ]
    assert _rows(encounter, "token", "type") == [
        _token("http://www.ama-assn.org/go/cpt", "99211", "office visit", "type")
    ]
    assert _rows(encounter, "reference", "location") == [_ref("Location", "hospital", None, "location")]
    assert _rows(encounter, "reference", "patient") == [_ref("Patient", "example", None, "patient")]


def test_synthea_encounter_rows() -> None:
    encounter = _synthea("Encounter")
    patient = "79a66c97-6131-3213-f3c9-4606946ab056"
    npi = "Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|9999974493"
    assert extract(encounter)["reference"] == [
        _ref(
            "Location",
            None,
            "Location?identifier=https://github.com/synthetichealth/synthea|3b23bdf7-5bd6-30bf-85a9-a37d7d74938a",
            "location",
        ),
        _ref("Practitioner", None, npi, "participant"),
        _ref("Patient", patient, None, "patient"),
        _ref("Practitioner", None, npi, "practitioner"),
        _ref(
            "Organization",
            None,
            "Organization?identifier=https://github.com/synthetichealth/synthea|a261e1fc-9361-3633-a2c4-8569a04b818d",
            "service-provider",
        ),
        _ref("Patient", patient, None, "subject"),
    ]
    assert extract(encounter)["token"] == [
        _token("http://terminology.hl7.org/CodeSystem/v3-ActCode", "AMB", None, "class"),
        _token(
            "https://github.com/synthetichealth/synthea",
            "00c7f717-4030-5582-2ed8-888ad2bc878e",
            None,
            "identifier",
        ),
        _token(
            "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
            "PPRF",
            "primary performer",
            "participant-type",
        ),
        _token("http://snomed.info/sct", "46177005", "end-stage renal disease (disorder)", "reason-code"),
        _token(None, "finished", None, "status"),
        _token("http://snomed.info/sct", "185347001", "encounter for problem (procedure)", "type"),
    ]
    assert extract(encounter)["date"] == [  # 1989-10-04T02:25:16-04:00 .. 1989-10-04T06:20:16-04:00
        {
            "param": "date",
            "low": _us("1989-10-04T06:25:16+00:00"),
            "high": _us("1989-10-04T10:20:16.999999+00:00"),
        }
    ]
    assert extract(encounter)["uri"] == [
        {"param": "_profile", "value": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-encounter"}
    ]
    assert extract(encounter)["string"] == extract(encounter)["number"] == extract(encounter)["quantity"] == []


def test_searchset_bundle_composition_refers_to_its_first_entry() -> None:
    bundle = _load("bundle-docref-example1.json")  # Bundle.entry[0].resource, evaluated with fhirpathpy
    assert _rows(bundle, "reference", "composition") == [_ref("DocumentReference", "ccd123", None, "composition")]


# --- value rules --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [
        ("2021", "2021-01-01T00:00:00+00:00", "2021-12-31T23:59:59.999999+00:00"),
        ("2024-02", "2024-02-01T00:00:00+00:00", "2024-02-29T23:59:59.999999+00:00"),
        ("2023-12", "2023-12-01T00:00:00+00:00", "2023-12-31T23:59:59.999999+00:00"),
        ("2021-03-04", "2021-03-04T00:00:00+00:00", "2021-03-04T23:59:59.999999+00:00"),
        ("2021-03-04T10:11", "2021-03-04T10:11:00+00:00", "2021-03-04T10:11:59.999999+00:00"),
        ("2021-03-04T10:11:12", "2021-03-04T10:11:12+00:00", "2021-03-04T10:11:12.999999+00:00"),
        ("2021-03-04T10:11:12Z", "2021-03-04T10:11:12+00:00", "2021-03-04T10:11:12.999999+00:00"),
        ("2021-03-04T10:11:12+02:00", "2021-03-04T08:11:12+00:00", "2021-03-04T08:11:12.999999+00:00"),
        ("2021-03-04T23:30:00-05:30", "2021-03-05T05:00:00+00:00", "2021-03-05T05:00:00.999999+00:00"),
        ("2021-03-04T10:11:12.5Z", "2021-03-04T10:11:12.500000+00:00", "2021-03-04T10:11:12.599999+00:00"),
        ("2021-03-04T10:11:12.123Z", "2021-03-04T10:11:12.123000+00:00", "2021-03-04T10:11:12.123999+00:00"),
        (
            "2021-03-04T10:11:12.123456Z",
            "2021-03-04T10:11:12.123456+00:00",
            "2021-03-04T10:11:12.123456+00:00",
        ),
        (
            "2021-03-04T10:11:12.1234567Z",
            "2021-03-04T10:11:12.123456+00:00",
            "2021-03-04T10:11:12.123456+00:00",
        ),
        ("1927-05-21", "1927-05-21T00:00:00+00:00", "1927-05-21T23:59:59.999999+00:00"),
        ("9999", "9999-01-01T00:00:00+00:00", "9999-12-31T23:59:59.999999+00:00"),
    ],
)
def test_date_range_covers_the_values_implicit_precision_in_utc(value: str, low: str, high: str) -> None:
    assert date_range(value) == (_us(low), _us(high))


@pytest.mark.parametrize(
    "value",
    [
        "",
        "21",
        "2021-13",
        "2021-02-30",
        "2021-00-10",
        "2021-03-04T24:00:00",
        "2021-03-04T10:60",
        "0000",
        "2021/03",
    ],
)
def test_date_range_refuses_what_is_not_a_fhir_date(value: str) -> None:
    with pytest.raises(ValueError):
        date_range(value)


def test_sentinels_lie_outside_every_date() -> None:
    assert DATE_MIN < date_range("0001")[0] and date_range("9999")[1] < DATE_MAX


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (100, (100.0, 99.5, 100.5)),
        (1.5, (1.5, 1.45, 1.55)),
        (Decimal("1.50"), (1.5, 1.495, 1.505)),
        ("0.001", (0.001, 0.0005, 0.0015)),
        (-2, (-2.0, -2.5, -1.5)),
        (1e-7, (1e-7, 0.5e-7, 1.5e-7)),
        ("1e3", (1000.0, 500.0, 1500.0)),
    ],
)
def test_number_range_is_half_a_unit_of_the_last_digit(value: Any, expected: tuple[float, float, float]) -> None:
    assert number_range(value) == expected


@pytest.mark.parametrize("value", [True, "abc", "NaN", None, [1]])
def test_number_range_refuses_non_numbers(value: Any) -> None:
    with pytest.raises(ValueError):
        number_range(value)


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("Patient/123", ("Patient", "123", None)),
        ("Patient/123/_history/4", ("Patient", "123", None)),
        ("https://ex.org/fhir/Patient/a.b-c", ("Patient", "a.b-c", "https://ex.org/fhir/Patient/a.b-c")),
        (
            "http://ex.org/fhir/Observation/o1/_history/2",
            ("Observation", "o1", "http://ex.org/fhir/Observation/o1/_history/2"),
        ),
        (
            "urn:uuid:9d6d3d4e-0a3a-4d52-9c1e-0c1d4d6b0f2a",
            (None, None, "urn:uuid:9d6d3d4e-0a3a-4d52-9c1e-0c1d4d6b0f2a"),
        ),
        ("#contained-1", (None, None, "#contained-1")),
        ("Practitioner?identifier=x|1", ("Practitioner", None, "Practitioner?identifier=x|1")),
        ("Nonsense/123", (None, None, "Nonsense/123")),
        ("http://ex.org/other/thing", (None, None, "http://ex.org/other/thing")),
    ],
)
def test_split_reference(reference: str, expected: tuple[str | None, str | None, str | None]) -> None:
    assert split_reference(reference) == expected


def test_string_norm_is_lower_case_without_accents_and_exact_is_as_written() -> None:
    patient = {
        "resourceType": "Patient",
        "name": [{"family": "Ångström", "given": ["Zoë", "Zoë"], "text": "Zoë Å."}],
    }
    assert _rows(patient, "string", "name") == [
        {"param": "name", "norm": "angstrom", "exact": "Ångström"},
        {"param": "name", "norm": "zoe a.", "exact": "Zoë Å."},
        {"param": "name", "norm": "zoe", "exact": "Zoë"},
    ]


def test_reference_type_alone_decides_resolve_is_patient() -> None:
    urn = "urn:uuid:9d6d3d4e-0a3a-4d52-9c1e-0c1d4d6b0f2a"
    on_patient = {"resourceType": "Observation", "subject": {"reference": urn, "type": "Patient"}}
    on_group = {"resourceType": "Observation", "subject": {"reference": "Group/g1"}}
    assert _rows(on_patient, "reference", "patient") == [_ref("Patient", None, urn, "patient")]
    assert _rows(on_group, "reference", "patient") == []
    assert _rows(on_group, "reference", "subject") == [_ref("Group", "g1", None, "subject")]


def test_a_reference_by_identifier_gives_a_row_with_its_type_and_no_target_and_one_by_display_only_none() -> None:
    obs = {"resourceType": "Observation", "subject": {"identifier": {"value": "x"}, "display": "Someone"}}
    assert _rows(obs, "reference", "subject") == [_ref(None, None, None, "subject")]
    typed = {"resourceType": "Observation", "subject": {"type": "Patient", "identifier": {"value": "x"}}}
    assert _rows(typed, "reference", "subject") == [_ref("Patient", None, None, "subject")]
    assert _rows(typed, "reference", "patient") == [_ref("Patient", None, None, "patient")]
    named = {"resourceType": "Observation", "subject": {"display": "Someone"}}
    assert _rows(named, "reference", "subject") == []


def test_canonical_reference_keeps_the_url_with_and_without_version() -> None:
    request = {
        "resourceType": "ServiceRequest",
        "instantiatesCanonical": ["http://ex.org/PlanDefinition/p|2.0"],
    }
    assert _rows(request, "reference", "instantiates-canonical") == [
        _ref(None, None, "http://ex.org/PlanDefinition/p|2.0", "instantiates-canonical"),
        _ref(None, None, "http://ex.org/PlanDefinition/p", "instantiates-canonical"),
    ]


def test_period_open_ends_use_the_sentinels() -> None:
    encounter = {"resourceType": "Encounter", "period": {"start": "2020-01-01"}}
    assert _rows(encounter, "date", "date") == [
        {"param": "date", "low": _us("2020-01-01T00:00:00+00:00"), "high": DATE_MAX}
    ]
    encounter = {"resourceType": "Encounter", "period": {"end": "2020"}}
    assert _rows(encounter, "date", "date") == [
        {"param": "date", "low": DATE_MIN, "high": _us("2020-12-31T23:59:59.999999+00:00")}
    ]


def test_timing_covers_its_first_to_its_last_event() -> None:
    request = {
        "resourceType": "ServiceRequest",
        "occurrenceTiming": {"event": ["2021-05-03", "2021-05-01T10:00:00Z", "2021-05-02"]},
    }
    assert _rows(request, "date", "occurrence") == [
        {
            "param": "occurrence",
            "low": _us("2021-05-01T10:00:00+00:00"),
            "high": _us("2021-05-03T23:59:59.999999+00:00"),
        }
    ]


def test_token_rules_for_codeable_concept_text_identifier_contact_point_and_boolean() -> None:
    condition = {"resourceType": "Condition", "code": {"text": "Opioid use disorder"}}
    assert _rows(condition, "token", "code") == [_token(None, None, "opioid use disorder", "code")]
    practitioner = {
        "resourceType": "Practitioner",
        "active": False,
        "telecom": [{"system": "email", "value": "a@b.org"}, {"system": "phone", "value": "555"}],
        "identifier": [{"type": {"text": "NPI"}, "system": "http://hl7.org/fhir/sid/us-npi", "value": "123"}],
    }
    assert _rows(practitioner, "token", "active") == [_token(None, "false", None, "active")]
    assert _rows(practitioner, "token", "email") == [_token(None, "a@b.org", None, "email")]
    assert _rows(practitioner, "token", "telecom") == [
        _token(None, "a@b.org", None, "telecom"),
        _token(None, "555", None, "telecom"),
    ]
    assert _rows(practitioner, "token", "identifier") == [
        _token("http://hl7.org/fhir/sid/us-npi", "123", "npi", "identifier")
    ]


def test_meta_tag_security_and_source_are_indexed() -> None:
    patient = {
        "resourceType": "Patient",
        "meta": {
            "tag": [{"system": "http://ex.org/tags", "code": "iop"}],
            "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "42CFRPart2"}],
            "source": "http://ex.org/ehr",
        },
    }
    assert _rows(patient, "token", "_tag") == [_token("http://ex.org/tags", "iop", None, "_tag")]
    assert _rows(patient, "token", "_security") == [
        _token("http://terminology.hl7.org/CodeSystem/v3-ActCode", "42CFRPart2", None, "_security")
    ]
    assert _rows(patient, "uri", "_source") == [{"param": "_source", "value": "http://ex.org/ehr"}]


def test_money_range_and_age_quantities() -> None:
    invoice = {"resourceType": "Invoice", "totalNet": {"value": 12.5, "currency": "USD"}}
    assert _rows(invoice, "quantity", "totalnet") == [
        {
            "param": "totalnet",
            "value": 12.5,
            "low": 12.45,
            "high": 12.55,
            "system": "urn:iso:std:iso:4217",
            "code": "USD",
            "unit": None,
        }
    ]
    age = {"value": 40, "system": "http://unitsofmeasure.org", "code": "a", "unit": "yr"}
    condition = {"resourceType": "Condition", "onsetAge": age, "abatementRange": {"low": age}}
    assert _rows(condition, "quantity", "onset-age") == [
        {
            "param": "onset-age",
            "value": 40.0,
            "low": 39.5,
            "high": 40.5,
            "system": age["system"],
            "code": "a",
            "unit": "yr",
        }
    ]
    assert _rows(condition, "quantity", "abatement-age") == [
        {
            "param": "abatement-age",
            "value": 40.0,
            "low": 40.0,
            "high": NUMBER_MAX,
            "system": age["system"],
            "code": "a",
            "unit": "yr",
        }
    ]


def test_number_parameter() -> None:
    assessment = {"resourceType": "RiskAssessment", "prediction": [{"probabilityDecimal": 0.25}]}
    assert _rows(assessment, "number", "probability") == [
        {"param": "probability", "value": 0.25, "low": 0.245, "high": 0.255}
    ]


def test_insurance_plan_name_uses_the_corrected_expression() -> None:
    plan = {"resourceType": "InsurancePlan", "name": "Gold", "alias": ["Au"]}
    assert _rows(plan, "string", "name") == _strings("name", "Gold", "Au")


def test_unknown_resource_type_gives_empty_rows() -> None:
    assert extract({"resourceType": "Nonsense", "id": "x"}) == {kind: [] for kind in indexing.KINDS}


def test_values_that_are_not_dates_give_no_row() -> None:
    patient = {"resourceType": "Patient", "birthDate": "yesterday"}
    assert _rows(patient, "date", "birthdate") == []


# --- coverage of the R4 parameters --------------------------------------------------------------------------


def test_indexed_params_skip_id_last_updated_text_and_composites_but_keep_meta_params() -> None:
    params = indexed_params("Observation")
    assert {"_tag", "_security", "_profile", "_source", "code", "patient", "value-quantity"} <= set(params)
    assert not {"_id", "_lastUpdated", "_text", "_content", "_query", "code-value-quantity"} & set(params)
    assert all(p.type in indexing.KINDS for p in params.values())


def test_every_indexable_r4_parameter_is_indexed_but_the_short_unsupported_list() -> None:
    assert len(indexing.UNSUPPORTED) <= 3
    for res_type in definitions.resource_types():
        expected = {
            name
            for name, p in definitions.search_params(res_type).items()
            if p.type in indexing.KINDS
            and name not in indexing.SKIPPED_PARAMS
            and (res_type, name) not in indexing.UNSUPPORTED
        }
        assert set(indexed_params(res_type)) == expected, res_type


def test_only_three_expressions_need_fhirpathpy() -> None:
    slow = {
        (res_type, plan.name)
        for res_type in definitions.resource_types()
        for plan in indexing._plans(res_type)
        if plan.fast is None
    }
    assert slow == {("Bundle", "composition"), ("Bundle", "message"), ("Patient", "deceased")}
    counts = indexing.path_counts()
    assert counts["fhirpathpy"] == 3 and counts["fast"] > 2000


def test_union_members_left_out_are_only_of_the_unindexed_datatypes() -> None:
    dropped = {
        (res_type, plan.name): plan.dropped
        for res_type in definitions.resource_types()
        for plan in indexing._plans(res_type)
        if plan.dropped
    }
    assert set(dropped) == {
        ("CarePlan", "activity-date"),  # scheduledString
        ("Consent", "source-reference"),  # sourceAttachment
        ("Immunization", "date"),  # occurrenceString
        ("Observation", "combo-value-quantity"),  # valueSampledData
        ("Observation", "component-value-quantity"),
        ("Observation", "value-quantity"),
        ("Procedure", "date"),  # performedString, performedAge, performedRange
    }
    for reasons in dropped.values():
        for reason in reasons:
            assert any(f"{kind} " in reason and t in reason for kind, t in indexing.UNINDEXED_TYPES), reason


def test_rows_have_exactly_the_columns_of_their_table() -> None:
    rows = extract(_load("Observation-average-blood-pressure.json"))
    rows["string"] = extract(_load("patient-example.json"))["string"]
    rows["number"] = extract({"resourceType": "RiskAssessment", "prediction": [{"probabilityDecimal": 0.2}]})["number"]
    for kind, table in schema.INDEX_TABLES.items():
        columns = [c.name for c in table.columns if c.name not in ("res_type", "res_id")]
        assert rows[kind], kind
        for row in indexing.mark_sort_rows(kind, rows[kind]):  # as the store writes them
            assert list(row) == columns, kind


# --- fast path == fhirpathpy, and speed ---------------------------------------------------------------------


def _examples() -> list[Any]:
    cases = []
    for folder in ("us-core", "ds4p", "opioid-cds-drug-screens"):
        for path in sorted((EXAMPLES / folder).glob("*.json")):
            cases.append(pytest.param([json.loads(path.read_text())], id=f"{folder}/{path.name}"))
    for path in sorted(SYNTHEA.glob("*.ndjson")):
        resources = [json.loads(line) for line in path.read_text().splitlines() if line]
        cases.append(pytest.param(resources, id=f"synthea/{path.name}"))
    return cases


def _sorted(rows: dict[str, list[dict[str, Any]]]) -> dict[str, list[str]]:
    return {kind: sorted(json.dumps(r, sort_keys=True) for r in kind_rows) for kind, kind_rows in rows.items()}


@pytest.mark.parametrize("resources", _examples())
def test_fast_path_agrees_with_fhirpathpy(resources: list[dict[str, Any]]) -> None:
    for resource in resources:
        if resource["resourceType"] == "Bundle":
            resources = resources + [e["resource"] for e in resource.get("entry", ()) if "resource" in e]
    for resource in resources:
        assert _sorted(extract(resource)) == _sorted(extract_with_fhirpathpy(resource)), resource.get("id")


def test_median_cost_per_resource_is_well_under_half_a_millisecond() -> None:
    resources = [json.loads(p.read_text()) for p in sorted(US_CORE.glob("*.json"))]
    for resource in resources:
        extract(resource)  # compile the plans first
    costs = []
    for resource in resources:
        start = time.perf_counter()
        extract(resource)
        costs.append(time.perf_counter() - start)
    assert statistics.median(costs) < 0.0005
