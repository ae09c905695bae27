"""The IOP record schemas: contract payloads load unchanged; every problem is one issue with code, path and reason."""

from __future__ import annotations

import copy
import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from iop_fhir.errors import Invalid, Issue
from iop_fhir.iop import schemas

CONTRACT = Path(__file__).resolve().parents[3] / "shared" / "contract"
DELETE = object()


def contract(kind: str) -> dict[str, Any]:
    # A group session names three enrollments ({{enrollment_id}}, {{enrollment_id_2}}, ...): each its own id.
    text = re.sub(
        r"\{\{enrollment_id(_[0-9]+)?\}\}", lambda _: str(uuid.uuid4()), (CONTRACT / f"{kind}.json").read_text()
    )
    payload: dict[str, Any] = json.loads(text)
    return payload


def changed(kind: str, path: str, value: Any) -> dict[str, Any]:
    """The contract payload of ``kind`` with the field at ``path`` (``a.b[2].c``) set to ``value`` or deleted."""
    payload = contract(kind)
    steps: list[str | int] = [int(s) if s.isdigit() else s for s in re.findall(r"[^.\[\]]+", path)]
    node: Any = payload
    for step in steps[:-1]:
        node = node[step]
    if value is DELETE:
        del node[steps[-1]]
    else:
        node[steps[-1]] = value
    return payload


def problems(kind: str, payload: Any) -> list[Issue]:
    with pytest.raises(Invalid) as caught:
        schemas.load(kind, payload)
    return caught.value.issues


def only_problem(kind: str, payload: Any) -> Issue:
    found = problems(kind, payload)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("kind", schemas.KINDS)
def test_every_contract_payload_loads_unchanged(kind: str) -> None:
    payload = contract(kind)
    original = copy.deepcopy(payload)
    loaded = schemas.load(kind, payload)
    assert loaded == original
    assert json.dumps(loaded, sort_keys=True) == json.dumps(original, sort_keys=True)
    assert payload == original


def test_dates_and_date_times_stay_the_strings_sent() -> None:
    loaded = schemas.load("session", contract("session"))
    assert loaded["start"] == "2026-01-07T18:00:00-05:00"
    assert schemas.load("consent", contract("consent"))["signed_on"] == "2026-03-20"


def test_optional_fields_a_program_sends_are_accepted() -> None:
    enrollment = contract("enrollment")
    enrollment["patient"]["email"] = "jordan.reyes@example.org"
    enrollment["patient"]["address"]["country"] = "US"
    assert schemas.load("enrollment", enrollment) == enrollment


@pytest.mark.parametrize(
    ("kind", "path", "field"),
    [("session", "", "location"), ("session", "", "minutes"), ("treatment-plan", "", "notes")],
)
def test_a_field_no_mapping_would_carry_is_refused_rather_than_silently_dropped(
    kind: str, path: str, field: str
) -> None:
    payload = contract(kind)
    payload[field] = 1 if field == "minutes" else "x"
    with pytest.raises(Invalid) as error:
        schemas.load(kind, payload)
    assert error.value.issues[0].expression == field
    assert error.value.issues[0].code == "structure"


def test_an_instrument_may_give_items_without_a_total() -> None:
    payload = changed("assessment", "instruments[0].total_score", DELETE)
    assert schemas.load("assessment", payload) == payload


def test_kinds_and_their_url_names_correspond() -> None:
    assert schemas.KINDS == (
        "enrollment",
        "assessment",
        "treatment-plan",
        "session",
        "group-session",
        "consent",
        "discharge",
        "medication",
        "partner",
    )
    assert [schemas.PLURALS[k] for k in schemas.KINDS] == [
        "enrollments",
        "assessments",
        "treatment-plans",
        "sessions",
        "group-sessions",
        "consents",
        "discharges",
        "medications",
        "partners",
    ]
    assert {schemas.KIND_OF_PLURAL[schemas.PLURALS[k]] for k in schemas.KINDS} == set(schemas.KINDS)


@pytest.mark.parametrize(
    ("kind", "path", "expression"),
    [
        ("enrollment", "patient.name.family", "patient.name.family"),
        ("enrollment", "patient.identifiers", "patient.identifiers"),
        ("enrollment", "admission_date", "admission_date"),
        ("assessment", "instruments[0].instrument", "instruments[0].instrument"),
        ("treatment-plan", "period.start", "period.start"),
        ("session", "drug_screen.results[2].analyte", "drug_screen.results[2].analyte"),
        ("session", "enrollment_id", "enrollment_id"),
        ("consent", "purposes", "purposes"),
        ("discharge", "referral.partner", "referral.partner"),
        ("partner", "fhir_base_url", "fhir_base_url"),
        ("partner", "auth.token_url", "auth.token_url"),
    ],
)
def test_a_missing_required_field_is_a_required_issue_at_its_path(kind: str, path: str, expression: str) -> None:
    issue = only_problem(kind, changed(kind, path, DELETE))
    assert (issue.code, issue.expression) == ("required", expression)
    assert "required" in issue.diagnostics


@pytest.mark.parametrize(
    ("kind", "path", "value", "fragment"),
    [
        ("session", "craving_score", "4", "must be an integer, got string"),
        ("session", "craving_score", 4.5, "must be an integer, got 4.5"),
        ("session", "craving_score", True, "must be an integer, got boolean"),
        ("session", "drug_screen.results[2].analyte", 5, "must be a string, got number"),
        ("session", "drug_screen", [], "must be a JSON object, got array"),
        ("session", "facilitator.name", None, "must not be null"),
        ("assessment", "triggers", "work stress", "must be a JSON array, got string"),
        ("enrollment", "support_contacts[1].family_sessions", "yes", "must be true or false, got string"),
        ("treatment-plan", "goals[2].target", "90%", "must be a number, got string"),
    ],
)
def test_a_wrong_json_type_is_a_structure_issue(kind: str, path: str, value: Any, fragment: str) -> None:
    issue = only_problem(kind, changed(kind, path, value))
    assert (issue.code, issue.expression) == ("structure", path)
    assert fragment in issue.diagnostics


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("session", "mood"),
        ("enrollment", "patient.middle_name"),
        ("assessment", "instruments[1].score"),
        ("discharge", "continuing_care.relapse_prevention_plan.hobbies"),
    ],
)
def test_an_unknown_field_is_a_structure_issue_listing_the_allowed_fields(kind: str, path: str) -> None:
    issue = only_problem(kind, changed(kind, path, "x"))
    assert (issue.code, issue.expression) == ("structure", path)
    assert issue.diagnostics.startswith("unknown field; allowed fields: ")


def test_the_unknown_field_issue_names_exactly_the_fields_of_its_object() -> None:
    issue = only_problem("session", changed("session", "drug_screen.results[0].cutoff", 50))
    assert issue.diagnostics == "unknown field; allowed fields: analyte, result, unit, value"


def test_an_unknown_asam_dimension_is_rejected_listing_the_six_dimensions() -> None:
    issue = only_problem("assessment", changed("assessment", "asam_dimensions.sleep", 2))
    assert (issue.code, issue.expression) == ("structure", "asam_dimensions.sleep")
    assert issue.diagnostics == (
        "unknown field; allowed fields: biomedical, emotional_behavioral, readiness_to_change, recovery_environment, "
        "relapse_potential, withdrawal"
    )


@pytest.mark.parametrize(
    ("kind", "path", "value", "fragment"),
    [
        ("session", "craving_score", 12, "must be between 0 and 10, got 12"),
        ("session", "craving_score", -1, "must be between 0 and 10, got -1"),
        ("assessment", "asam_dimensions.relapse_potential", 5, "must be between 0 and 4, got 5"),
        ("assessment", "instruments[1].total_score", -3, "must be at least 0, got -3"),
        ("treatment-plan", "interventions[0].frequency", 0, "must be at least 1, got 0"),
        ("treatment-plan", "interventions[0].period", 0, "must be greater than 0, got 0"),
        ("treatment-plan", "interventions[1].minutes", 900, "must be between 1 and 600, got 900"),
        ("treatment-plan", "goals[3].target", -9, "must be at least 0, got -9"),
        ("discharge", "continuing_care.services[1].period", -1, "must be greater than 0, got -1"),
        ("enrollment", "admission_date", "01/05/2026", "must be a date YYYY-MM-DD"),
        ("enrollment", "patient.birth_date", "1987-02-30", "is not a calendar date"),
        ("assessment", "performed_at", "2026-01-05", "must be a date-time"),
        ("session", "drug_screen.collected_at", "2026-01-07T25:05:00-05:00", "is not a valid date-time"),
        ("enrollment", "patient.email", "jordan.reyes", "must be an email address"),
        ("enrollment", "patient.phone", "call me", "must be a phone number"),
        ("enrollment", "referral.service_request", "ServiceRequest/88213", "must be an http or https URL"),
        ("enrollment", "patient.identifiers[0].system", "MRN", "must be an absolute URI"),
        ("partner", "fhir_base_url", "ftp://fhir.example/R4", "must be an http or https URL"),
        ("assessment", "clinician.npi", "123456789", "must be an NPI of ten digits"),
        ("consent", "purposes", [], "must not be empty"),
        ("session", "topic", "   ", "must not be empty"),
        ("session", "service", " group-therapy", "must not start or end with whitespace"),
        ("consent", "recipient", "passaic valley", "must be 1 to 64 letters, digits, '-' or '.'"),
    ],
)
def test_a_bad_value_is_a_value_issue_saying_why(kind: str, path: str, value: Any, fragment: str) -> None:
    issue = only_problem(kind, changed(kind, path, value))
    assert (issue.code, issue.expression) == ("value", path)
    assert fragment in issue.diagnostics


@pytest.mark.parametrize("value", ["2026-01-07T18:00:00", "2026-01-07T18:00:00.250"])
def test_a_date_time_without_timezone_offset_is_rejected(value: str) -> None:
    issue = only_problem("session", changed("session", "start", value))
    assert (issue.code, issue.expression) == ("value", "start")
    assert "timezone offset" in issue.diagnostics


@pytest.mark.parametrize("value", ["2026-01-07T18:00:00Z", "2026-01-07T23:00:00+00:00", "2026-01-07T18:00:00.5-05:00"])
def test_a_date_time_with_zone_or_offset_is_accepted(value: str) -> None:
    payload = changed("session", "start", value)
    payload["end"] = "2026-01-08T02:00:00Z"
    assert schemas.load("session", payload)["start"] == value


@pytest.mark.parametrize("npi", ["1234567893", "1245319599"])
def test_an_npi_with_a_valid_check_digit_is_accepted(npi: str) -> None:
    assert schemas.npi_check_digit_is_valid(npi)
    assert schemas.load("session", changed("session", "facilitator.npi", npi))["facilitator"]["npi"] == npi


@pytest.mark.parametrize("npi", ["1234567890", "1245319598", "2234567893"])
def test_an_npi_with_a_wrong_check_digit_is_rejected(npi: str) -> None:
    assert not schemas.npi_check_digit_is_valid(npi)
    issue = only_problem("treatment-plan", changed("treatment-plan", "care_team[1].npi", npi))
    assert (issue.code, issue.expression) == ("value", "care_team[1].npi")
    assert "check digit" in issue.diagnostics


@pytest.mark.parametrize(
    ("kind", "path", "value", "fragment"),
    [
        ("session", "end", "2026-01-07T17:59:59-05:00", "must not be before start"),
        ("session", "end", "2026-01-07T22:00:00Z", "must not be before start"),  # 17:00 in New Jersey
        ("treatment-plan", "period.end", "2026-01-04", "must not be before start"),
        ("consent", "expires_on", "2026-03-19", "must not be before signed_on"),
        ("session", "drug_screen.results[2].analyte", "cannabinoids", "analyte 'cannabinoids' appears more than once"),
        ("discharge", "goal_outcomes[3].goal", "triggers", "goal 'triggers' appears more than once"),
    ],
)
def test_a_broken_rule_between_fields_is_an_invariant_issue_on_the_later_field(
    kind: str, path: str, value: Any, fragment: str
) -> None:
    issue = only_problem(kind, changed(kind, path, value))
    assert (issue.code, issue.expression) == ("invariant", path)
    assert fragment in issue.diagnostics


@pytest.mark.parametrize("value", ["2026-01-07T18:00:00-05:00", "2026-01-07T23:00:00Z"])
def test_a_session_may_end_when_it_starts(value: str) -> None:
    assert schemas.load("session", changed("session", "end", value))["end"] == value


def test_a_consent_may_expire_on_the_day_it_is_signed() -> None:
    assert schemas.load("consent", changed("consent", "expires_on", "2026-03-20"))["expires_on"] == "2026-03-20"


@pytest.mark.parametrize("partner_id", ["passaic-valley-recovery", "PVR.2026", "a", "x" * 64])
def test_a_partner_id_matching_the_fhir_id_pattern_is_accepted(partner_id: str) -> None:
    assert schemas.load("partner", changed("partner", "id", partner_id))["id"] == partner_id


@pytest.mark.parametrize("partner_id", ["passaic_valley", "passaic valley", "x" * 65, "pvr/1", "récupération"])
def test_a_partner_id_outside_the_fhir_id_pattern_is_rejected(partner_id: str) -> None:
    issue = only_problem("partner", changed("partner", "id", partner_id))
    assert (issue.code, issue.expression) == ("value", "id")
    assert "1 to 64 letters, digits, '-' or '.'" in issue.diagnostics


def test_an_unknown_partner_kind_is_rejected_listing_the_allowed_kinds() -> None:
    issue = only_problem("partner", changed("partner", "kind", "pharmacy"))
    assert (issue.code, issue.expression) == ("value", "kind")
    assert issue.diagnostics == "must be one of: hospital-ehr, inpatient-unit, aftercare-provider; got 'pharmacy'"


def test_an_unknown_auth_type_is_rejected_listing_the_allowed_types() -> None:
    issue = only_problem("partner", changed("partner", "auth.type", "basic"))
    assert (issue.code, issue.expression) == ("value", "auth.type")
    assert "must be one of: none, bearer, smart-backend-services" in issue.diagnostics


def test_auth_fields_of_another_auth_type_are_rejected() -> None:
    payload = contract("partner")
    payload["auth"] = {"type": "none", "client_id": "iop-clifton"}
    issue = only_problem("partner", payload)
    assert (issue.code, issue.expression) == ("invariant", "auth.client_id")
    assert "not used when type is none" in issue.diagnostics


def test_bearer_auth_needs_a_token_file() -> None:
    payload = contract("partner")
    payload["auth"] = {"type": "bearer"}
    issue = only_problem("partner", payload)
    assert (issue.code, issue.expression) == ("required", "auth.token_file")
    payload["auth"] = {"type": "bearer", "token_file": "keys/passaic-valley.token"}
    assert schemas.load("partner", payload) == payload


@pytest.mark.parametrize("body", [[], "session", 3, None, True])
def test_a_body_that_is_not_an_object_is_one_structure_issue_without_path(body: Any) -> None:
    issue = only_problem("session", body)
    assert (issue.code, issue.expression) == ("structure", None)
    assert "must be a JSON object" in issue.diagnostics


def test_every_problem_of_a_payload_is_reported_at_once() -> None:
    payload = contract("session")
    payload["craving_score"] = 12
    payload["attendance"] = 1
    payload["bogus"] = True
    del payload["modality"]
    payload["drug_screen"]["results"][1]["result"] = ""
    found = {(i.code, i.expression) for i in problems("session", payload)}
    assert found == {
        ("value", "craving_score"),
        ("structure", "attendance"),
        ("structure", "bogus"),
        ("required", "modality"),
        ("value", "drug_screen.results[1].result"),
    }


def test_an_invariant_is_checked_even_when_other_fields_are_wrong() -> None:
    payload = changed("session", "end", "2026-01-07T17:00:00-05:00")
    payload["craving_score"] = 11
    found = {(i.code, i.expression) for i in problems("session", payload)}
    assert found == {("value", "craving_score"), ("invariant", "end")}


def test_the_issue_list_is_capped_with_a_note_of_how_many_more() -> None:
    payload = contract("assessment")
    payload["triggers"] = [7] * (schemas.MAX_ISSUES + 30)
    found = problems("assessment", payload)
    assert len(found) == schemas.MAX_ISSUES + 1
    assert found[-1].severity == "information"
    assert found[-1].diagnostics == "30 further problems are not listed"


def test_a_retraction_has_an_optional_reason_and_nothing_else() -> None:
    assert schemas.load_retraction(None) is None
    assert schemas.load_retraction({}) is None
    assert schemas.load_retraction({"reason": "entered for the wrong patient"}) == "entered for the wrong patient"
    with pytest.raises(Invalid) as caught:
        schemas.load_retraction({"reason": "x", "by": "me"})
    assert [(i.code, i.expression) for i in caught.value.issues] == [("structure", "by")]


@pytest.mark.parametrize("candidacy", [{}, {"stable_housing": None}])
def test_a_candidacy_that_answers_nothing_is_refused_naming_it(candidacy: dict[str, Any]) -> None:
    payload = json.loads((CONTRACT / "enrollment.json").read_text(encoding="utf-8"))
    payload["candidacy"] = candidacy
    with pytest.raises(Invalid) as error:
        schemas.load("enrollment", payload)
    # an empty object says nothing; a null answer is not a boolean
    assert [i.expression for i in error.value.issues] in (["candidacy"], ["candidacy.stable_housing"])
