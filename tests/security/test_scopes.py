"""SMART v2 scope parsing and the permission each interaction needs (iop_fhir.security.scopes, no app)."""

from __future__ import annotations

import pytest

from iop_fhir.security.scopes import INTERACTIONS, Scope, ScopeError, Scopes, permissions_for

LAB = "http://terminology.hl7.org/CodeSystem/observation-category|laboratory"


@pytest.mark.parametrize(
    ("text", "context", "resource_type", "permissions", "query"),
    [
        ("system/CarePlan.rs", "system", "CarePlan", "rs", ()),
        ("system/*.cruds", "system", "*", "cruds", ()),
        ("system/Observation.c", "system", "Observation", "c", ()),
        ("system/Observation.cud", "system", "Observation", "cud", ()),
        ("user/Observation.r", "user", "Observation", "r", ()),
        ("patient/Patient.s", "patient", "Patient", "s", ()),
        ("system/Patient.read", "system", "Patient", "rs", ()),
        ("system/Patient.write", "system", "Patient", "cud", ()),
        ("system/*.*", "system", "*", "cruds", ()),
        ("user/*.read", "user", "*", "rs", ()),
        (f"system/Observation.rs?category={LAB}", "system", "Observation", "rs", (("category", LAB),)),
        (
            "system/Observation.s?category=survey&code=http://loinc.org|44249-1",
            "system",
            "Observation",
            "s",
            (("category", "survey"), ("code", "http://loinc.org|44249-1")),
        ),
        (
            "system/Observation.rs?code=http://loinc.org%7C44249-1",
            "system",
            "Observation",
            "rs",
            (("code", "http://loinc.org|44249-1"),),
        ),
    ],
)
def test_valid_scope_is_parsed_into_context_type_permissions_and_query(
    text: str, context: str, resource_type: str, permissions: str, query: tuple[tuple[str, str], ...]
) -> None:
    scope = Scope.parse(text)

    assert (scope.context, scope.resource_type, scope.permissions, scope.query) == (
        context,
        resource_type,
        permissions,
        query,
    )
    assert str(scope) == text


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("system/CarePlan.sr", "in that order"),
        ("system/CarePlan.rr", "in that order"),
        ("system/CarePlan.RS", "in that order"),
        ("system/CarePlan.x", "in that order"),
        ("system/CarePlan.", "in that order"),
        ("system/CarePlan.rs.x", "in that order"),
        ("system/CarePlan.readwrite", "in that order"),
        ("system/CarePlan", "<context>/<resource type>.<permissions>"),
        ("admin/CarePlan.rs", "starts with one of"),
        ("CarePlan.rs", "starts with one of"),
        ("system/Careplan.rs", "'Careplan' is not an R4 resource type"),
        ("system//CarePlan.rs", "is not an R4 resource type"),
        ("system/CarePlan.read?category=x", "only v2 scopes"),
        ("system/CarePlan.rs?", "needs a name and a value"),
        ("system/CarePlan.rs?category=", "needs a name and a value"),
        ("system/CarePlan.rs?=x", "needs a name and a value"),
        ("system/CarePlan.rs?category", "name=value pairs"),
        ("system/CarePlan.rs?a=b&", "name=value pairs"),
        ('system/CarePlan.rs?a="b"', "printable ASCII"),
        ("system/CarePlan.rś", "printable ASCII"),
    ],
)
def test_invalid_scope_is_rejected_with_an_error_naming_it(text: str, why: str) -> None:
    with pytest.raises(ScopeError) as raised:
        Scope.parse(text)

    assert raised.value.scope == text
    assert repr(text) in str(raised.value)
    assert why in raised.value.why


def test_invalid_scope_in_a_scope_string_is_named_among_valid_ones() -> None:
    with pytest.raises(ScopeError) as raised:
        Scopes.parse("system/Patient.rs system/Bogus.rs system/CarePlan.rs")

    assert raised.value.scope == "system/Bogus.rs"


def test_unknown_word_is_not_a_scope() -> None:
    with pytest.raises(ScopeError) as raised:
        Scopes.parse("system/Patient.rs admin")

    assert raised.value.scope == "admin"


def test_non_resource_smart_scopes_are_kept_and_grant_nothing() -> None:
    scopes = Scopes.parse("openid fhirUser launch/patient offline_access")

    assert scopes.other_scopes == ("openid", "fhirUser", "launch/patient", "offline_access")
    assert scopes.resource_scopes == ()
    assert not scopes.allows("Patient", "read")


def test_scope_string_and_list_parse_alike_and_repeated_scopes_are_kept_once() -> None:
    from_string = Scopes.parse("  system/Patient.rs\tsystem/CarePlan.cruds system/Patient.rs openid ")
    from_items = Scopes.parse(["system/Patient.rs", "system/CarePlan.cruds openid"])

    assert from_string == from_items
    assert str(from_string) == "system/Patient.rs system/CarePlan.cruds openid"


def test_v1_scope_keeps_its_text_and_reads_as_v2() -> None:
    scope = Scope.parse("system/Patient.read")

    assert str(scope) == "system/Patient.read"
    assert scope.v2 == "system/Patient.rs"


def test_empty_scope_string_grants_nothing() -> None:
    scopes = Scopes.parse("")

    assert not scopes
    assert not scopes.allows("Patient", "read")


ALL_INTERACTIONS = sorted(INTERACTIONS)


@pytest.mark.parametrize(
    ("scopes", "res_type", "interaction", "allowed"),
    [
        # r: instance-level reads
        ("system/CarePlan.r", "CarePlan", "read", True),
        ("system/CarePlan.r", "CarePlan", "vread", True),
        ("system/CarePlan.r", "CarePlan", "history-instance", True),
        ("system/CarePlan.r", "CarePlan", "search", False),
        ("system/CarePlan.r", "CarePlan", "history-type", False),
        # s: type- and system-level search and history
        ("system/CarePlan.s", "CarePlan", "search", True),
        ("system/CarePlan.s", "CarePlan", "search-type", True),
        ("system/CarePlan.s", "CarePlan", "search-system", True),
        ("system/CarePlan.s", "CarePlan", "history-type", True),
        ("system/CarePlan.s", "CarePlan", "history-system", True),
        ("system/CarePlan.s", "CarePlan", "read", False),
        # c u d
        ("system/CarePlan.c", "CarePlan", "create", True),
        ("system/CarePlan.c", "CarePlan", "update", False),
        ("system/CarePlan.u", "CarePlan", "update", True),
        ("system/CarePlan.u", "CarePlan", "patch", True),
        ("system/CarePlan.u", "CarePlan", "create", False),
        ("system/CarePlan.d", "CarePlan", "delete", True),
        ("system/CarePlan.rs", "CarePlan", "delete", False),
        ("system/CarePlan.rs", "CarePlan", "create", False),
        ("system/CarePlan.rs", "CarePlan", "update", False),
        # conditional interactions also need s: their answer tells whether records match
        ("system/CarePlan.c", "CarePlan", "conditional-create", False),
        ("system/CarePlan.cs", "CarePlan", "conditional-create", True),
        ("system/CarePlan.u", "CarePlan", "conditional-update", False),
        ("system/CarePlan.us", "CarePlan", "conditional-update", True),
        ("system/CarePlan.u system/CarePlan.s", "CarePlan", "conditional-update", True),
        ("system/CarePlan.u system/*.s", "CarePlan", "conditional-update", True),
        ("system/CarePlan.s", "CarePlan", "conditional-update", False),
        ("system/CarePlan.us", "CarePlan", "conditional-patch", True),
        ("system/CarePlan.d", "CarePlan", "conditional-delete", False),
        ("system/CarePlan.ds", "CarePlan", "conditional-delete", True),
        # a scope names one type, or every type with *
        ("system/Observation.rs", "CarePlan", "read", False),
        ("system/Observation.rs", "CarePlan", "search", False),
        ("system/Observation.rs", "Observation", "create", False),
        ("system/Observation.rs", "Observation", "search", True),
        ("system/*.rs", "CarePlan", "read", True),
        ("system/*.rs", "CarePlan", "update", False),
        # v1 forms
        ("system/Patient.read", "Patient", "read", True),
        ("system/Patient.read", "Patient", "search", True),
        ("system/Patient.read", "Patient", "create", False),
        ("system/Patient.write", "Patient", "update", True),
        ("system/Patient.write", "Patient", "delete", True),
        ("system/Patient.write", "Patient", "read", False),
        ("system/*.*", "Consent", "delete", True),
        # only system/ scopes without a query grant here
        ("user/*.cruds", "Patient", "read", False),
        ("patient/*.rs", "Patient", "read", False),
        (f"system/Observation.rs?category={LAB}", "Observation", "read", False),
        (f"system/Observation.rs?category={LAB} system/Observation.s", "Observation", "search", True),
        # operations
        ("system/Patient.r", "Patient", "$validate", True),
        ("system/Patient.c", "Patient", "$validate", False),
        ("system/Patient.r", "Patient", "$everything", False),
        ("system/Patient.rs", "Patient", "$everything", True),
        ("system/*.rs", "Observation", "$export", True),
    ],
)
def test_scopes_allow_exactly_the_interactions_their_permissions_cover(
    scopes: str, res_type: str, interaction: str, allowed: bool
) -> None:
    assert Scopes.parse(scopes).allows(res_type, interaction) is allowed


@pytest.mark.parametrize("interaction", ALL_INTERACTIONS)
def test_system_wildcard_cruds_allows_every_interaction(interaction: str) -> None:
    assert Scopes.parse("system/*.cruds").allows("CarePlan", interaction)


@pytest.mark.parametrize(
    ("scopes", "res_type", "interaction", "needed"),
    [
        ("system/Observation.rs", "CarePlan", "read", "system/CarePlan.r"),
        ("system/Observation.rs", "CarePlan", "search", "system/CarePlan.s"),
        ("system/Observation.rs", "Observation", "create", "system/Observation.c"),
        ("system/CarePlan.u", "CarePlan", "conditional-update", "system/CarePlan.us"),
        ("system/CarePlan.rs", "CarePlan", "$everything", None),
        ("system/CarePlan.rs", "CarePlan", "read", None),
    ],
)
def test_denied_names_the_scope_the_interaction_needs(
    scopes: str, res_type: str, interaction: str, needed: str | None
) -> None:
    assert Scopes.parse(scopes).denied(res_type, interaction) == needed


def test_unknown_interaction_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown interaction '\\$purge'"):
        Scopes.parse("system/*.cruds").allows("Patient", "$purge")


def test_bare_history_is_refused_as_ambiguous() -> None:
    with pytest.raises(ValueError, match="history-instance"):
        permissions_for("history")


def test_matching_lists_restricted_and_non_system_scopes_for_whoever_applies_them() -> None:
    scopes = Scopes.parse(f"system/Observation.rs?category={LAB} patient/*.r system/CarePlan.r user/Observation.c")

    assert [str(s) for s in scopes.matching("Observation", "r")] == [
        f"system/Observation.rs?category={LAB}",
        "patient/*.r",
    ]
    assert [s.query for s in scopes.matching("Observation", "s")] == [(("category", LAB),)]
    assert scopes.matching("Observation", "d") == ()


def test_matching_takes_one_permission_letter() -> None:
    with pytest.raises(ValueError, match="one letter"):
        Scopes.parse("system/*.rs").matching("Patient", "rs")
