"""r4/search.py: the search query string as a typed request (https://hl7.org/fhir/R4/search.html)."""

from __future__ import annotations

import pytest

from iop_fhir.errors import BadRequest, NotFound
from iop_fhir.r4.indexing import date_range
from iop_fhir.r4.search import (
    DateValue,
    Filter,
    Include,
    NumberValue,
    ReferenceValue,
    SearchRequest,
    SortKey,
    StringValue,
    TokenValue,
    UriValue,
    parse,
    split_values,
    unescape,
)


def one(res_type: str, key: str, value: str) -> Filter:
    request = parse(res_type, [(key, value)])
    assert len(request.filters) == 1
    return request.filters[0]


def refused(res_type: str, params: list[tuple[str, str]], **kwargs: object) -> tuple[str, str | None, str]:
    with pytest.raises(BadRequest) as caught:
        parse(res_type, params, **kwargs)  # type: ignore[arg-type]
    issue = caught.value.issues[0]
    return issue.code, issue.expression, issue.diagnostics


# -- token ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://loinc.org|44249-1", TokenValue("http://loinc.org", "44249-1")),
        ("44249-1", TokenValue(None, "44249-1")),
        ("|44249-1", TokenValue("", "44249-1")),
        ("http://loinc.org|", TokenValue("http://loinc.org", None)),
        ("urn:oid:1.2|a\\|b", TokenValue("urn:oid:1.2", "a|b")),
    ],
)
def test_token_forms_give_system_and_code(value: str, expected: TokenValue) -> None:
    f = one("Observation", "code", value)
    assert (f.param, f.kind, f.modifier, f.values) == ("code", "token", None, (expected,))


def test_comma_is_or_within_one_parameter_and_escaped_comma_is_not() -> None:
    f = one("Observation", "code", "a,b\\,c")
    assert f.values == (TokenValue(None, "a"), TokenValue(None, "b,c"))


@pytest.mark.parametrize(("key", "value"), [("code", "a,"), ("code", ",a"), ("subject", "Patient/1,,Patient/2")])
def test_empty_alternative_in_a_list_is_invalid(key: str, value: str) -> None:
    code, expression, diagnostics = refused("Observation", [(key, value)])
    assert (code, expression) == ("invalid", key)
    assert "empty value" in diagnostics


def test_repeated_parameter_is_and_of_filters() -> None:
    request = parse("Observation", [("code", "a"), ("code", "b")])
    assert [f.values for f in request.filters] == [(TokenValue(None, "a"),), (TokenValue(None, "b"),)]


def test_token_with_two_pipes_is_refused_with_its_name() -> None:
    code, expression, diagnostics = refused("Observation", [("code", "a|b|c")])
    assert (code, expression) == ("invalid", "code")
    assert "'a|b|c'" in diagnostics


def test_token_with_empty_system_and_code_is_refused() -> None:
    assert refused("Observation", [("code", "|")])[:2] == ("invalid", "code")


def test_token_not_and_text_modifiers() -> None:
    assert one("Observation", "status:not", "final").modifier == "not"
    f = one("Observation", "code:text", "Héart Rate")
    assert (f.modifier, f.values) == ("text", (StringValue("Héart Rate", "heart rate"),))


# -- string --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("modifier", ["", ":exact", ":contains"])
def test_string_keeps_value_and_lower_cased_accentless_form(modifier: str) -> None:
    f = one("Patient", "family" + modifier, "Muñoz")
    assert f.values == (StringValue("Muñoz", "munoz"),)
    assert f.modifier == (modifier[1:] or None)


def test_string_modifier_on_a_token_is_not_supported() -> None:
    code, expression, diagnostics = refused("Patient", [("gender:exact", "male")])
    assert (code, expression) == ("not-supported", "gender:exact")
    assert ":exact" in diagnostics and "gender" in diagnostics


# -- date ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"])
def test_date_prefixes_keep_the_implicit_range_of_the_value(prefix: str) -> None:
    f = one("Observation", "date", f"{prefix}2021-03")
    low, high = date_range("2021-03")
    assert f.values == (DateValue(prefix, low, high),)
    assert high - low + 1 == 31 * 86_400 * 1_000_000


def test_date_without_prefix_is_eq() -> None:
    assert one("Patient", "birthdate", "1990").values == (DateValue("eq", *date_range("1990")),)


def test_date_time_zone_plus_decoded_as_space_is_restored() -> None:
    f = one("Observation", "date", "2021-03-04T10:00:00 01:00")
    assert f.values == (DateValue("eq", *date_range("2021-03-04T10:00:00+01:00")),)


@pytest.mark.parametrize("value", ["2021-13", "2021-02-30", "yesterday", "xx2021", "2021-01-01T25:00"])
def test_malformed_date_is_refused_as_invalid_with_its_name(value: str) -> None:
    code, expression, diagnostics = refused("Observation", [("date", value)])
    assert (code, expression) == ("invalid", "date")
    assert value in diagnostics


def test_ap_on_a_date_is_not_supported() -> None:
    assert refused("Observation", [("date", "ap2021")])[:2] == ("not-supported", "date")


def test_last_updated_is_a_date_on_the_resources_table() -> None:
    f = one("Patient", "_lastUpdated", "gt2024-01-01T00:00:00Z")
    assert (f.param, f.kind) == ("_lastUpdated", "date")
    assert f.values == (DateValue("gt", *date_range("2024-01-01T00:00:00Z")),)


# -- number / quantity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("100", NumberValue("eq", 100.0, 99.5, 100.5)),
        ("gt100.00", NumberValue("gt", 100.0, 99.995, 100.005)),
        ("le1e2", NumberValue("le", 100.0, 50.0, 150.0)),
        ("ap-3", NumberValue("ap", -3.0, -3.5, -2.5)),
    ],
)
def test_number_has_prefix_value_and_precision_range(value: str, expected: NumberValue) -> None:
    assert one("RiskAssessment", "probability", value).values == (expected,)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "5.4|http://unitsofmeasure.org|mg",
            NumberValue("eq", 5.4, 5.35, 5.45, "http://unitsofmeasure.org", "mg"),
        ),
        ("lt5.4||mg", NumberValue("lt", 5.4, 5.35, 5.45, None, "mg")),
        ("ge5", NumberValue("ge", 5.0, 4.5, 5.5)),
    ],
)
def test_quantity_has_number_system_and_code(value: str, expected: NumberValue) -> None:
    assert one("Observation", "value-quantity", value).values == (expected,)


@pytest.mark.parametrize(
    ("res_type", "key", "value"),
    [
        ("RiskAssessment", "probability", "abc"),
        ("RiskAssessment", "probability", "gt"),
        ("Observation", "value-quantity", "5.4|mg"),
        ("Observation", "value-quantity", "five||mg"),
    ],
)
def test_malformed_number_or_quantity_is_invalid(res_type: str, key: str, value: str) -> None:
    assert refused(res_type, [(key, value)])[:2] == ("invalid", key)


# -- reference -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "expected", "target_type"),
    [
        ("subject", "Patient/123", ReferenceValue("Patient", "123"), None),
        ("subject", "123", ReferenceValue(None, "123"), None),
        ("patient", "123", ReferenceValue("Patient", "123"), None),  # one target type: the id names it
        ("subject:Patient", "123", ReferenceValue("Patient", "123"), "Patient"),
        ("subject", "Patient/123/_history/2", ReferenceValue("Patient", "123"), None),
        (
            "subject",
            "http://other.org/fhir/Patient/9",
            ReferenceValue(url="http://other.org/fhir/Patient/9"),
            None,
        ),
        (
            "subject",
            "urn:uuid:8d0c5b0e-7b0f-4b8a-9d5a-3d2f0b8d2a11",
            ReferenceValue(url="urn:uuid:8d0c5b0e-7b0f-4b8a-9d5a-3d2f0b8d2a11"),
            None,
        ),
    ],
)
def test_reference_forms(key: str, value: str, expected: ReferenceValue, target_type: str | None) -> None:
    f = one("Observation", key, value)
    assert (f.param, f.kind, f.values, f.target_type) == (
        key.split(":")[0],
        "reference",
        (expected,),
        target_type,
    )


def test_absolute_reference_on_this_server_is_relative() -> None:
    request = parse(
        "Observation",
        [("subject", "https://iop.example/fhir/Patient/7")],
        base_url="https://iop.example/fhir",
    )
    assert request.filters[0].values == (ReferenceValue("Patient", "7"),)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("subject", "Medication/1"),  # not a target of Observation.subject
        ("subject", "Nope/1"),
        ("subject:Patient", "Group/1"),
        ("subject", "Patient/bad id"),
        ("subject", "a/b/c"),
        ("subject:Medication", "1"),
    ],
)
def test_bad_reference_is_invalid_with_the_parameter_as_given(key: str, value: str) -> None:
    assert refused("Observation", [(key, value)])[:2] == ("invalid", key)


def test_identifier_modifier_on_reference_is_not_supported() -> None:
    assert refused("Observation", [("subject:identifier", "sys|1")])[:2] == (
        "not-supported",
        "subject:identifier",
    )


# -- uri -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("modifier", ["", ":below", ":above"])
def test_uri_value_and_modifiers(modifier: str) -> None:
    f = one("ValueSet", "url" + modifier, "http://hl7.org/fhir/ValueSet/x")
    assert (f.kind, f.modifier, f.values) == (
        "uri",
        modifier[1:] or None,
        (UriValue("http://hl7.org/fhir/ValueSet/x"),),
    )


# -- :missing ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("res_type", "param", "kind"),
    [
        ("Observation", "code", "token"),
        ("Patient", "family", "string"),
        ("Observation", "date", "date"),
        ("RiskAssessment", "probability", "number"),
        ("Observation", "value-quantity", "quantity"),
        ("Observation", "subject", "reference"),
        ("ValueSet", "url", "uri"),
    ],
)
@pytest.mark.parametrize("value", ["true", "false"])
def test_missing_is_accepted_on_every_kind(res_type: str, param: str, kind: str, value: str) -> None:
    f = one(res_type, f"{param}:missing", value)
    assert (f.kind, f.modifier, f.missing, f.values) == (kind, "missing", value == "true", ())


def test_missing_takes_only_true_or_false() -> None:
    code, expression, diagnostics = refused("Patient", [("family:missing", "yes")])
    assert (code, expression) == ("invalid", "family:missing")
    assert "'yes'" in diagnostics


# -- _id -----------------------------------------------------------------------------------------------------


def test_id_is_searched_on_the_resources_table() -> None:
    f = one("Patient", "_id", "a,b-1.2")
    assert (f.param, f.values) == ("_id", (TokenValue(None, "a"), TokenValue(None, "b-1.2")))


def test_id_with_a_bad_id_is_invalid() -> None:
    assert refused("Patient", [("_id", "a b")])[:2] == ("invalid", "_id")


def test_id_with_not_modifier_is_not_supported() -> None:
    assert refused("Patient", [("_id:not", "a")])[:2] == ("not-supported", "_id:not")


# -- unknown / unsupported -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("foo", "Unknown search parameter 'foo'"),
        ("_has:Observation:patient:code", "'_has'"),
        ("code-value-quantity", "'code-value-quantity' (composite)"),
        ("_text", "'_text'"),
        ("_content", "'_content'"),
        ("code:in", "':in'"),
        ("code:below", "':below'"),
        ("date:exact", "':exact'"),
    ],
)
def test_unknown_or_unsupported_parameter_is_not_supported_with_its_name(key: str, words: str) -> None:
    code, expression, diagnostics = refused("Observation", [(key, "x")])
    assert (code, expression) == ("not-supported", key)
    assert words in diagnostics


def test_lenient_drops_unknown_parameters_and_records_them() -> None:
    request = parse("Patient", [("family", "x"), ("foo", "1"), ("gender:exact", "male")], lenient=True)
    assert [f.name for f in request.filters] == ["family"]
    assert request.ignored == ("foo", "gender:exact")
    assert request.query() == "family=x&_count=20"


def test_lenient_still_refuses_malformed_values() -> None:
    assert refused("Patient", [("birthdate", "soon")], lenient=True)[:2] == ("invalid", "birthdate")


def test_parameter_with_empty_value_is_ignored() -> None:
    assert parse("Patient", [("family", ""), ("_count", "")]) == SearchRequest("Patient")


def test_unknown_resource_type_is_not_found() -> None:
    with pytest.raises(NotFound):
        parse("Patientx", [])


# -- chaining ------------------------------------------------------------------------------------------------


def test_chain_with_explicit_type() -> None:
    f = one("Observation", "subject:Patient.identifier", "http://hospital.org/mrn|12345")
    assert (f.param, f.kind, f.target_type) == ("subject", "reference", "Patient")
    assert f.chain == Filter(
        "identifier",
        "identifier",
        "token",
        "http://hospital.org/mrn|12345",
        values=(TokenValue("http://hospital.org/mrn", "12345"),),
    )


def test_chain_type_is_inferred_when_only_one_target_has_the_parameter() -> None:
    f = one("Observation", "patient.name", "peter")
    assert f.target_type == "Patient"
    assert f.chain is not None and f.chain.values == (StringValue("peter", "peter"),)


def test_chain_with_modifier_on_the_chained_parameter() -> None:
    f = one("Encounter", "subject:Patient.family:exact", "Chalmers")
    assert f.chain is not None and (f.chain.name, f.chain.modifier) == ("family:exact", "exact")


def test_ambiguous_chain_is_invalid_and_names_the_candidates() -> None:
    code, expression, diagnostics = refused("Observation", [("subject.name", "x")])
    assert (code, expression) == ("invalid", "subject.name")
    assert "Patient" in diagnostics and "Location" in diagnostics


def test_chain_through_a_non_reference_is_invalid() -> None:
    assert refused("Observation", [("code.name", "x")])[:2] == ("invalid", "code.name")


def test_chain_two_levels_deep_is_not_supported() -> None:
    key = "subject:Patient.organization.name"
    assert refused("Observation", [(key, "x")])[:2] == ("not-supported", key)


def test_chain_to_unknown_parameter_of_target_is_not_supported() -> None:
    key = "subject:Patient.nope"
    assert refused("Observation", [(key, "x")])[:2] == ("not-supported", key)


def test_malformed_value_in_a_chain_names_the_whole_parameter() -> None:
    key = "subject:Patient.birthdate"
    assert refused("Observation", [(key, "soon")])[:2] == ("invalid", key)


# -- result parameters ---------------------------------------------------------------------------------------


def test_count_is_capped_at_max_count_and_zero_is_allowed() -> None:
    assert parse("Patient", [("_count", "5000")], max_count=100).count == 100
    assert parse("Patient", [("_count", "0")]).count == 0
    assert parse("Patient", [], default_count=7).count == 7


@pytest.mark.parametrize(("key", "value"), [("_count", "-1"), ("_count", "ten"), ("_offset", "-5"), ("_offset", "1.5")])
def test_count_and_offset_must_be_non_negative_integers(key: str, value: str) -> None:
    assert refused("Patient", [(key, value)])[:2] == ("invalid", key)


def test_sort_keys_with_direction() -> None:
    request = parse("Observation", [("_sort", "-date,code,_id,-_lastUpdated")])
    assert request.sort == (
        SortKey("date", "date", True),
        SortKey("code", "token", False),
        SortKey("_id", "token", False),
        SortKey("_lastUpdated", "date", True),
    )


@pytest.mark.parametrize(
    ("value", "code"),
    [("nope", "not-supported"), ("code-value-quantity", "not-supported"), ("date,,code", "invalid")],
)
def test_bad_sort_key_is_refused_naming_sort(value: str, code: str) -> None:
    assert refused("Observation", [("_sort", value)])[:2] == (code, "_sort")


@pytest.mark.parametrize("value", ["true", "text", "data", "count", "false"])
def test_summary_values(value: str) -> None:
    assert parse("Patient", [("_summary", value)]).summary == value


@pytest.mark.parametrize(("key", "value"), [("_summary", "yes"), ("_total", "all")])
def test_summary_and_total_take_only_their_codes(key: str, value: str) -> None:
    code, expression, diagnostics = refused("Patient", [(key, value)])
    assert (code, expression) == ("invalid", key)
    assert f"'{value}'" in diagnostics


@pytest.mark.parametrize(
    ("params", "wanted"),
    [
        ([], False),
        ([("_total", "accurate")], True),
        ([("_total", "estimate")], True),
        ([("_total", "none")], False),
        ([("_summary", "count")], True),
        ([("_count", "0")], True),
        ([("_count", "0"), ("_total", "none")], False),
    ],
)
def test_wants_total(params: list[tuple[str, str]], wanted: bool) -> None:
    assert parse("Patient", params).wants_total is wanted


def test_elements_are_top_level_names() -> None:
    assert parse("Patient", [("_elements", "name, birthDate")]).elements == ("name", "birthDate")
    assert refused("Patient", [("_elements", "name.family")])[:2] == ("invalid", "_elements")


def test_elements_with_summary_is_invalid() -> None:
    assert refused("Patient", [("_summary", "true"), ("_elements", "name")])[:2] == ("invalid", "_elements")


def test_format_and_pretty_are_accepted_and_left_out_of_links() -> None:
    request = parse("Patient", [("_format", "json"), ("_pretty", "true"), ("gender", "male")])
    assert request.query() == "gender=male&_count=20"


# -- _include / _revinclude ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("_include", "Observation:subject", Include("Observation", "subject")),
        ("_include", "Observation:subject:Patient", Include("Observation", "subject", "Patient")),
        ("_include", "*", Include(None, None)),
        ("_include", "Observation:*", Include("Observation", None)),
        ("_include:iterate", "Patient:organization", Include("Patient", "organization", iterate=True)),
        ("_include:recurse", "Patient:organization", Include("Patient", "organization", iterate=True)),
        ("_revinclude", "Provenance:target", Include("Provenance", "target", reverse=True)),
        (
            "_revinclude:iterate",
            "Observation:has-member",
            Include("Observation", "has-member", iterate=True, reverse=True),
        ),
    ],
)
def test_include_forms(key: str, value: str, expected: Include) -> None:
    request = parse("Observation", [(key, value)])
    assert request.includes == (expected,)
    assert f"{key.replace(':recurse', ':iterate')}={value}" in request.query()


@pytest.mark.parametrize(
    ("key", "value", "code"),
    [
        ("_include", "Observation", "invalid"),
        ("_include", "Observation:code", "invalid"),  # not a reference
        ("_include", "Observation:nope", "invalid"),
        ("_include", "Patient:organization", "invalid"),  # not the searched type, without :iterate
        ("_include", "Observation:subject:Medication", "invalid"),
        ("_include", "Nope:subject", "invalid"),
        ("_revinclude", "*", "invalid"),
        ("_revinclude", "Encounter:service-provider", "invalid"),  # can never point to an Observation
        ("_include:deep", "Observation:subject", "not-supported"),
    ],
)
def test_bad_include_is_refused_naming_it(key: str, value: str, code: str) -> None:
    assert refused("Observation", [(key, value)])[:2] == (code, key)


# -- canonical query string ----------------------------------------------------------------------------------


def test_query_renders_filters_in_order_then_result_parameters_then_paging() -> None:
    request = parse(
        "Observation",
        [
            ("_count", "10"),
            ("code", "http://loinc.org|44249-1,x\\,y"),
            ("subject:Patient.family", "O'Brien"),
            ("date", "ge2021-01-01T00:00:00+01:00"),
            ("_sort", "-date"),
            ("_revinclude", "Provenance:target"),
            ("_include", "Observation:subject"),
            ("_total", "accurate"),
            ("_offset", "20"),
        ],
    )
    assert request.query() == (
        "code=http://loinc.org%7C44249-1,x%5C,y&subject:Patient.family=O%27Brien"
        "&date=ge2021-01-01T00:00:00%2B01:00&_sort=-date&_revinclude=Provenance:target"
        "&_include=Observation:subject&_total=accurate&_count=10&_offset=20"
    )
    assert request.query(offset=0).endswith("&_count=10")
    assert request.query(offset=30, count=5).endswith("&_count=5&_offset=30")


def test_query_of_a_request_round_trips_through_parse() -> None:
    from urllib.parse import parse_qsl

    params = [
        ("family:contains", "a,b"),
        ("birthdate", "lt2000"),
        ("_elements", "name,gender"),
        ("_summary", "false"),
    ]
    request = parse("Patient", params)
    assert parse("Patient", parse_qsl(request.query())) == request


# -- escaping ------------------------------------------------------------------------------------------------


def test_split_and_unescape() -> None:
    assert split_values("a\\,b,c\\\\,d") == ["a\\,b", "c\\\\", "d"]
    assert [unescape(v) for v in split_values("a\\,b,c\\\\,d")] == ["a,b", "c\\", "d"]
    assert unescape("\\$x\\|y") == "$x|y"
