"""store/search_sql.py on SQLite and PostgreSQL, and the searchset Bundle (fhir/searchset.py) built from it.

Two data sets share one database per backend: the real examples of ../shared/fhir-examples indexed with
r4/indexing.py (expected ids computed from their JSON), and a few hand-made index rows that pin down the
comparison rules of https://hl7.org/fhir/R4/search.html (prefixes, precision, escapes, missing values).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import orjson
import pytest
from sqlalchemy import Engine, insert, text

from iop_fhir.fhir.searchset import SUBSETTED, searchset_bundle
from iop_fhir.r4 import indexing
from iop_fhir.r4 import search as search_rules
from iop_fhir.r4.indexing import date_range, normalize_string, number_range
from iop_fhir.r4.search import SearchRequest, parse
from iop_fhir.store import schema
from iop_fhir.store.base import SearchResult, StoredResource
from iop_fhir.store.search_sql import run
from tests.store.scratch import scratch_engine

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "fhir-examples"
if not EXAMPLES.exists():
    EXAMPLES = Path(os.environ.get("IOP_FHIR_EXAMPLES", "../shared/fhir-examples")).resolve()
BASE = "http://testserver/fhir"
T0 = 1_700_000_000_000_000  # last_updated of the first resource loaded; each next one is 1 µs later
UCUM = "http://unitsofmeasure.org"
SYS = "http://example.org/codes"


# -- data ----------------------------------------------------------------------------------------------------


def _examples() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for path in sorted((EXAMPLES / "synthea-10-patients").glob("*.ndjson")):
        found += [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    for folder in ("us-core", "opioid-cds-drug-screens"):
        for path in sorted((EXAMPLES / folder).glob("*.json")):
            resource = json.loads(path.read_text())
            if resource["resourceType"] != "Bundle":
                found.append(resource)
    return found


EXAMPLE_RESOURCES = _examples()
BY_KEY = {(r["resourceType"], r["id"]): r for r in EXAMPLE_RESOURCES}


def of_type(res_type: str) -> list[dict[str, Any]]:
    return [r for r in EXAMPLE_RESOURCES if r["resourceType"] == res_type]


def _hand_rows() -> list[tuple[str, str, dict[str, list[dict[str, Any]]], bool]]:
    """(type, id, index rows by kind, deleted) of the hand-made resources."""

    def date(param: str, *values: str | tuple[str, str | None]) -> dict[str, list[dict[str, Any]]]:
        rows = []
        for v in values:
            if isinstance(v, tuple):
                low = date_range(v[0])[0]
                high = date_range(v[1])[1] if v[1] else 2**62
            else:
                low, high = date_range(v)
            rows.append({"param": param, "low": low, "high": high})
        return {"date": rows}

    def number(text_value: str) -> dict[str, list[dict[str, Any]]]:
        value, low, high = number_range(text_value)
        return {"number": [{"param": "probability", "value": value, "low": low, "high": high}]}

    def quantity(system: str | None, code: str | None, unit: str | None) -> dict[str, list[dict[str, Any]]]:
        value, low, high = number_range("5.4") if code != "g" else number_range("5.6")
        row = {
            "param": "quantity",
            "value": value,
            "low": low,
            "high": high,
            "system": system,
            "code": code,
            "unit": unit,
        }
        return {"quantity": [row]}

    def token(system: str | None, code: str, display: str | None = None) -> dict[str, list[dict[str, Any]]]:
        return {"token": [{"param": "code", "system": system, "code": code, "text": display and display.lower()}]}

    def string(value: str) -> dict[str, list[dict[str, Any]]]:
        return {"string": [{"param": "name", "norm": normalize_string(value), "exact": value}]}

    def uri(value: str) -> dict[str, list[dict[str, Any]]]:
        return {"uri": [{"param": "url", "value": value}]}

    def ref(target_type: str | None, target_id: str | None, url: str | None = None) -> dict[str, list[dict[str, Any]]]:
        return {"reference": [{"param": "subject", "target_type": target_type, "target_id": target_id, "url": url}]}

    return [
        ("Appointment", "d-day", date("date", "2021-01-01"), False),
        ("Appointment", "d-year", date("date", "2021"), False),
        ("Appointment", "d-span", date("date", ("2020-12-15", "2021-01-15")), False),
        ("Appointment", "d-instant", date("date", "2022-03-04T10:00:00Z"), False),
        ("Appointment", "d-open", date("date", ("2021-06", None)), False),
        ("Appointment", "d-two", date("date", "2019-05-05", "2023-07-07"), False),
        # Date ranges: around a week long (below that a range finds a row from where it starts), longer, several.
        ("Schedule", "w-day", date("date", "2021-01-01"), False),
        ("Schedule", "w-week", date("date", ("2020-12-26", "2021-01-01")), False),
        ("Schedule", "w-eight-days", date("date", ("2020-12-25", "2021-01-01")), False),
        ("Schedule", "w-long", date("date", ("2020-11-01", "2021-01-02")), False),
        ("Schedule", "w-open", date("date", ("2021-01", None)), False),
        ("Schedule", "w-two", date("date", "2019-05-05", "2023-07-07"), False),
        ("Schedule", "w-three", date("date", "2020-12-01", "2021-02-01", "2021-03-01"), False),
        ("Appointment", "d-none", {}, False),
        ("Appointment", "d-deleted", date("date", "2021-01-01"), True),
        ("RiskAssessment", "n-100", number("100"), False),
        ("RiskAssessment", "n-100.4", number("100.4"), False),
        ("RiskAssessment", "n-99.5", number("99.5"), False),
        ("RiskAssessment", "n-100.5", number("100.5"), False),
        ("RiskAssessment", "n-1e3", number("1000"), False),
        ("RiskAssessment", "n-neg", number("-3"), False),
        ("Substance", "q-ucum-mg", quantity(UCUM, "mg", "mg"), False),
        ("Substance", "q-unit-mg", quantity(None, None, "mg"), False),
        ("Substance", "q-ucum-g", quantity(UCUM, "g", "gram"), False),
        ("Basic", "t-a", token(SYS, "x", "Héart Rate"), False),
        ("Basic", "t-b", token(None, "x"), False),
        ("Basic", "t-c", token(SYS, "y", "Heart beat"), False),
        ("Basic", "t-none", {}, False),
        ("Basic", "t-deleted", token(SYS, "x"), True),
        ("HealthcareService", "s-percent", string("100% Pure"), False),
        ("HealthcareService", "s-underscore", string("a_b"), False),
        ("HealthcareService", "s-plain", string("AXB"), False),
        ("HealthcareService", "s-munoz", string("Muñoz"), False),
        ("ValueSet", "u-base", uri("http://acme.org/fhir/ValueSet/a"), False),
        ("ValueSet", "u-child", uri("http://acme.org/fhir/ValueSet/a/b"), False),
        ("ValueSet", "u-upper", uri("http://ACME.org/fhir/ValueSet/a/c"), False),
        ("ValueSet", "u-root", uri("http://acme.org/fhir"), False),
        ("Basic", "r-rel", ref("Patient", "p1"), False),
        ("Basic", "r-abs", ref("Patient", "p1", "http://other.org/fhir/Patient/p1"), False),
        ("Basic", "r-urn", ref(None, None, "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0"), False),
        ("Basic", "r-del", ref("Patient", "p2"), False),
        ("Patient", "p1", {}, False),
        ("Patient", "p2", {}, True),
    ]


HAND = _hand_rows()


def _load(engine: Engine) -> None:
    resources: list[dict[str, Any]] = []
    index: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for resource in EXAMPLE_RESOURCES:
        res_type, res_id = resource["resourceType"], resource["id"]
        resources.append(_row(res_type, res_id, len(resources), orjson.dumps(resource), False))
        for kind, rows in indexing.extract(resource).items():
            marked = indexing.mark_sort_rows(kind, rows)  # as the store writes them
            index[kind] += [{**row, "res_type": res_type, "res_id": res_id} for row in marked]
    for res_type, res_id, rows_by_kind, deleted in HAND:
        content = None if deleted else orjson.dumps({"resourceType": res_type, "id": res_id})
        resources.append(_row(res_type, res_id, len(resources), content, deleted))
        for kind, rows in rows_by_kind.items():
            # A deleted resource keeps stale index rows here: search must still never return it.
            marked = indexing.mark_sort_rows(kind, rows)
            index[kind] += [{**row, "res_type": res_type, "res_id": res_id} for row in marked]
    with engine.begin() as conn:
        conn.execute(insert(schema.resources), resources)
        for kind, rows in index.items():
            if rows:
                conn.execute(insert(schema.INDEX_TABLES[kind]), rows)
        if engine.dialect.name == "postgresql":
            conn.execute(text("ANALYZE"))


def _row(res_type: str, res_id: str, n: int, content: bytes | None, deleted: bool) -> dict[str, Any]:
    return {
        "res_type": res_type,
        "res_id": res_id,
        "version_id": 1,
        "last_updated": T0 + n,
        "deleted": deleted,
        "content": content,
    }


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A database per backend with the tables of store/schema.py and both data sets (read-only in tests)."""

    def prepare(engine: Engine) -> None:
        schema.metadata.create_all(engine)
        _load(engine)

    with scratch_engine(request.param, tmp_path_factory, "search", prepare) as engine:
        yield engine


def search(engine: Engine, res_type: str, params: list[tuple[str, str]]) -> tuple[SearchRequest, SearchResult]:
    request = parse(res_type, params)
    with engine.connect() as conn:
        return request, run(conn, request)


def ids(engine: Engine, res_type: str, params: list[tuple[str, str]]) -> set[str]:
    """Every matching id, over all pages (and checked to come without duplicates)."""
    _, result = search(engine, res_type, [*params, ("_count", "1000")])
    assert not result.has_more
    found = [m.res_id for m in result.matches]
    assert len(found) == len(set(found))
    return set(found)


def test_postgres_is_really_used(engine: Engine) -> None:
    assert engine.dialect.name in ("sqlite", "postgresql")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM resources")).scalar_one() == len(EXAMPLE_RESOURCES) + len(HAND)


# -- real examples: token, string, reference, date, chain ----------------------------------------------------


def _codings(value: Any) -> list[dict[str, Any]]:
    return list(value.get("coding", [])) if isinstance(value, dict) else []


def test_token_system_and_code_finds_exactly_the_conditions_with_that_coding(engine: Engine) -> None:
    system, code = "http://snomed.info/sct", "444814009"  # viral sinusitis
    expected = {
        c["id"]
        for c in of_type("Condition")
        if any(x.get("system") == system and x.get("code") == code for x in _codings(c.get("code")))
    }
    assert len(expected) > 3
    assert ids(engine, "Condition", [("code", f"{system}|{code}")]) == expected
    assert ids(engine, "Condition", [("code", code)]) == expected
    assert ids(engine, "Condition", [("code", f"|{code}")]) == set()


def test_token_system_only_and_or_of_codes(engine: Engine) -> None:
    conditions = of_type("Condition")
    snomed = {
        c["id"] for c in conditions if any(x.get("system") == "http://snomed.info/sct" for x in _codings(c["code"]))
    }
    assert ids(engine, "Condition", [("code", "http://snomed.info/sct|")]) == snomed
    a, b = "444814009", "195662009"
    either = {c["id"] for c in conditions if any(x.get("code") in (a, b) for x in _codings(c["code"]))}
    assert ids(engine, "Condition", [("code", f"{a},{b}")]) == either
    assert ids(engine, "Condition", [("code", a), ("code", b)]) == set()  # AND of two codes no condition has


def test_token_not_includes_resources_without_the_element(engine: Engine) -> None:
    encounters = of_type("Encounter")
    expected = {e["id"] for e in encounters if e.get("class", {}).get("code") != "AMB"}
    assert 0 < len(expected) < len(encounters)
    assert ids(engine, "Encounter", [("class:not", "AMB")]) == expected


def test_token_on_identifier_of_us_core_patient(engine: Engine) -> None:
    patient = BY_KEY[("Patient", "example")]
    ident = patient["identifier"][0]
    assert ids(engine, "Patient", [("identifier", f"{ident['system']}|{ident['value']}")]) == {"example"}


def test_string_is_case_and_accent_insensitive_starts_with(engine: Engine) -> None:
    patients = of_type("Patient")
    family = patients[0]["name"][0]["family"]
    prefix = family[:3].upper()
    expected = {
        p["id"]
        for p in patients
        if any(normalize_string(n.get("family", "")).startswith(normalize_string(prefix)) for n in p["name"])
    }
    assert ids(engine, "Patient", [("family", prefix)]) == expected
    assert ids(engine, "Patient", [("family:exact", family)]) == {
        p["id"] for p in patients if any(n.get("family") == family for n in p["name"])
    }
    assert ids(engine, "Patient", [("family:exact", family.lower())]) == set()
    middle = family[1:4]
    assert ids(engine, "Patient", [("family:contains", middle)]) == {
        p["id"] for p in patients if any(middle.lower() in n.get("family", "").lower() for n in p["name"])
    }


def test_reference_by_type_and_id_by_bare_id_and_by_single_target_param(engine: Engine) -> None:
    patient_id = of_type("Patient")[0]["id"]
    expected = {e["id"] for e in of_type("Encounter") if e["subject"]["reference"] == f"Patient/{patient_id}"}
    assert len(expected) > 20
    assert ids(engine, "Encounter", [("subject", f"Patient/{patient_id}")]) == expected
    assert ids(engine, "Encounter", [("subject", patient_id)]) == expected
    assert ids(engine, "Encounter", [("patient", patient_id)]) == expected
    assert ids(engine, "Encounter", [("subject:Patient", patient_id)]) == expected
    assert ids(engine, "Encounter", [("subject", "Group/" + patient_id)]) == set()


def test_date_eq_year_and_lt_on_birthdate(engine: Engine) -> None:
    patients = of_type("Patient")
    year = patients[0]["birthDate"][:4]
    assert ids(engine, "Patient", [("birthdate", year)]) == {p["id"] for p in patients if p["birthDate"][:4] == year}
    assert ids(engine, "Patient", [("birthdate", "lt1960")]) == {p["id"] for p in patients if p["birthDate"] < "1960"}


def test_chained_search_follows_the_reference_to_the_target_index(engine: Engine) -> None:
    patient = of_type("Patient")[1]
    family = patient["name"][0]["family"]
    owners = {p["id"] for p in of_type("Patient") if any(n.get("family") == family for n in p["name"])}
    expected = {e["id"] for e in of_type("Encounter") if e["subject"]["reference"].split("/")[1] in owners}
    assert expected
    assert ids(engine, "Encounter", [("subject:Patient.family", family)]) == expected
    assert ids(engine, "Encounter", [("patient.family", family.lower())]) == expected
    ident = patient["identifier"][0]
    assert ids(engine, "Encounter", [("patient.identifier", f"{ident['system']}|{ident['value']}")]) == {
        e["id"] for e in of_type("Encounter") if e["subject"]["reference"] == f"Patient/{patient['id']}"
    }


def test_chain_to_a_deleted_target_matches_nothing(engine: Engine) -> None:
    assert ids(engine, "Basic", [("subject:Patient._id", "p1")]) == {"r-rel", "r-abs"}
    assert ids(engine, "Basic", [("subject:Patient._id", "p2")]) == set()


def test_missing_true_and_false_partition_the_type(engine: Engine) -> None:
    conditions = of_type("Condition")
    abated = {c["id"] for c in conditions if "abatementDateTime" in c}
    assert 0 < len(abated) < len(conditions)
    assert ids(engine, "Condition", [("abatement-date:missing", "false")]) == abated
    assert ids(engine, "Condition", [("abatement-date:missing", "true")]) == {c["id"] for c in conditions} - abated


def test_id_and_and_of_filters(engine: Engine) -> None:
    patients = [p["id"] for p in of_type("Patient")]
    assert ids(engine, "Patient", [("_id", f"{patients[0]},{patients[1]},nope")]) == {
        patients[0],
        patients[1],
    }
    gender = BY_KEY[("Patient", patients[0])]["gender"]
    assert ids(engine, "Patient", [("_id", f"{patients[0]},{patients[1]}"), ("gender", gender)]) == {
        p for p in patients[:2] if BY_KEY[("Patient", p)]["gender"] == gender
    }


# -- hand-made rows: exact comparison rules ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2021", {"d-day", "d-year"}),
        ("eq2021", {"d-day", "d-year"}),
        ("ne2021", {"d-span", "d-instant", "d-open", "d-two"}),
        ("gt2021", {"d-instant", "d-open", "d-two"}),
        ("lt2021", {"d-span", "d-two"}),
        ("ge2021", {"d-instant", "d-open", "d-two", "d-day", "d-year"}),
        ("le2021", {"d-span", "d-two", "d-day", "d-year"}),
        ("sa2021", {"d-instant", "d-two"}),
        ("eb2021", {"d-two"}),
        ("2021-01-01", {"d-day"}),
        ("2022-03-04T10:00:00Z", {"d-instant"}),
        ("2022-03-04T11:00:00+01:00", {"d-instant"}),
        ("2022-03-04T10:00", {"d-instant"}),
        ("2022-03-04T10:00:01Z", set()),
        ("gt2099", {"d-open"}),
    ],
)
def test_date_prefixes_compare_ranges(engine: Engine, value: str, expected: set[str]) -> None:
    assert ids(engine, "Appointment", [("date", value)]) == expected


def test_date_range_by_two_parameters(engine: Engine) -> None:
    params = [("date", "ge2021-01-01"), ("date", "le2021-12-31")]
    assert ids(engine, "Appointment", params) == {"d-day", "d-year", "d-span", "d-open", "d-two"}


BOUNDS = [
    f"{prefix}{value}"
    for prefix in ("gt", "ge", "sa", "lt", "le", "eb")
    for value in ("2019", "2020-12-31", "2021-01-01", "2021-01-02T00:00:00Z", "2021-02", "2023-07-07", "2099")
]


@pytest.mark.parametrize(
    ("res_type", "param"),
    [("Schedule", "date"), ("Appointment", "date"), ("Condition", "onset-date"), ("Immunization", "date")],
)
def test_a_date_range_matches_exactly_what_each_of_its_bounds_matches(
    engine: Engine, res_type: str, param: str
) -> None:
    # A range is read as one set (search_sql.date_range); each bound alone is read by itself: they must agree, for
    # short rows, rows longer than a week, and resources whose bounds hold on different rows (w-two, w-three).
    by_itself = {b: ids(engine, res_type, [(param, b)]) for b in [*BOUNDS, "ne2021"]}
    assert any(by_itself[b] for b in BOUNDS), "the data must hold dates to compare"
    lowers = [b for b in BOUNDS if b[:2] in ("gt", "ge", "sa")]
    uppers = [b for b in BOUNDS if b[:2] in ("lt", "le", "eb")]
    for lower in lowers:
        for upper in uppers:
            expected = by_itself[lower] & by_itself[upper]
            assert ids(engine, res_type, [(param, lower), (param, upper)]) == expected, (lower, upper)
        upper = uppers[-1]  # and beside a bound that is no part of the range
        third = ids(engine, res_type, [(param, upper), (param, lower), (param, "ne2021")])
        assert third == by_itself[lower] & by_itself[upper] & by_itself["ne2021"], lower


def test_a_date_range_matches_a_resource_whose_bounds_hold_on_different_values(engine: Engine) -> None:
    # Each bound of a search is its own parameter (https://hl7.org/fhir/R4/search.html#combining): a resource with
    # values on either side of the range matches, though none of its values lies in it.
    assert ids(engine, "Schedule", [("date", "ge2021-01-15"), ("date", "lt2021-01-20")]) == {
        "w-two",
        "w-three",
        "w-open",
    }
    assert ids(engine, "Schedule", [("date", "sa2021-01-15"), ("date", "eb2021-01-20")]) == {"w-two", "w-three"}
    # and a row longer than a week that starts long before the range and ends in it
    assert ids(engine, "Schedule", [("date", "ge2021-01-01"), ("date", "lt2021-01-03")]) == {
        "w-day",
        "w-long",
        "w-open",
        "w-two",
        "w-three",
    }


def test_date_missing(engine: Engine) -> None:
    assert ids(engine, "Appointment", [("date:missing", "true")]) == {"d-none"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("100", {"n-100", "n-100.4", "n-99.5"}),
        ("100.0", {"n-100"}),
        ("1e2", {"n-100", "n-100.4", "n-99.5", "n-100.5"}),
        ("ne100", {"n-100.5", "n-1e3", "n-neg"}),
        ("gt100", {"n-100.4", "n-100.5", "n-1e3"}),
        ("ge100", {"n-100", "n-100.4", "n-100.5", "n-1e3"}),
        ("lt100", {"n-99.5", "n-neg"}),
        ("le100", {"n-100", "n-99.5", "n-neg"}),
        ("sa100", {"n-1e3"}),
        ("eb100", {"n-neg"}),
        ("ap100", {"n-100", "n-100.4", "n-99.5", "n-100.5"}),
        ("-3", {"n-neg"}),
    ],
)
def test_number_prefixes_and_precision(engine: Engine, value: str, expected: set[str]) -> None:
    assert ids(engine, "RiskAssessment", [("probability", value)]) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"5.4|{UCUM}|mg", {"q-ucum-mg"}),
        ("5.4||mg", {"q-ucum-mg", "q-unit-mg"}),
        ("5.4", {"q-ucum-mg", "q-unit-mg"}),
        (f"gt5|{UCUM}|", {"q-ucum-mg", "q-ucum-g"}),
        ("gt5.5||gram", {"q-ucum-g"}),
        (f"lt5.5|{UCUM}|g", set()),
    ],
)
def test_quantity_number_with_system_code_or_unit(engine: Engine, value: str, expected: set[str]) -> None:
    assert ids(engine, "Substance", [("quantity", value)]) == expected


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("code", "x", {"t-a", "t-b"}),
        ("code", f"{SYS}|x", {"t-a"}),
        ("code", "|x", {"t-b"}),
        ("code", f"{SYS}|", {"t-a", "t-c"}),
        ("code:not", "x", {"t-c", "t-none"}),
        ("code:not", f"{SYS}|x", {"t-b", "t-c", "t-none"}),
        ("code:text", "heart", {"t-c"}),
        ("code:text", "RATE", {"t-a"}),
        ("code:text", "héart", {"t-a"}),
        ("code:missing", "true", {"t-none"}),
    ],
)
def test_token_matching_rules(engine: Engine, key: str, value: str, expected: set[str]) -> None:
    found = ids(engine, "Basic", [(key, value)])
    assert found - {"r-rel", "r-abs", "r-urn", "r-del"} == expected


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("name", "100%", {"s-percent"}),
        ("name", "a_", {"s-underscore"}),
        ("name", "ax", {"s-plain"}),
        ("name:contains", "_", {"s-underscore"}),
        ("name:contains", "%", {"s-percent"}),
        ("name:contains", "x", {"s-plain"}),
        ("name", "MUÑ", {"s-munoz"}),
        ("name", "mun", {"s-munoz"}),
        ("name:exact", "Muñoz", {"s-munoz"}),
        ("name:exact", "munoz", set()),
    ],
)
def test_string_wildcards_are_literal(engine: Engine, key: str, value: str, expected: set[str]) -> None:
    assert ids(engine, "HealthcareService", [(key, value)]) == expected


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("url", "http://acme.org/fhir/ValueSet/a", {"u-base"}),
        ("url:below", "http://acme.org/fhir/ValueSet/a", {"u-base", "u-child"}),
        ("url:above", "http://acme.org/fhir/ValueSet/a/b", {"u-base", "u-child", "u-root"}),
        ("url", "http://acme.org/fhir/valueset/a", set()),
    ],
)
def test_uri_exact_below_above_are_case_sensitive(engine: Engine, key: str, value: str, expected: set[str]) -> None:
    assert ids(engine, "ValueSet", [(key, value)]) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://other.org/fhir/Patient/p1", {"r-abs"}),
        ("urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0", {"r-urn"}),
        ("Patient/p1", {"r-rel", "r-abs"}),
    ],
)
def test_reference_by_url(engine: Engine, value: str, expected: set[str]) -> None:
    assert ids(engine, "Basic", [("subject", value)]) == expected


def test_deleted_resources_never_match(engine: Engine) -> None:
    assert "d-deleted" not in ids(engine, "Appointment", [("date", "2021-01-01")])
    assert "t-deleted" not in ids(engine, "Basic", [("code", "x")])
    assert "p2" not in ids(engine, "Patient", [("_id", "p1,p2")])
    _, result = search(engine, "Basic", [("_id", "r-rel,r-del"), ("_include", "Basic:subject")])
    assert [(r.res_type, r.res_id) for r in result.included] == [("Patient", "p1")]


def test_last_updated_on_the_resources_table(engine: Engine) -> None:
    # T0 is 2023-11-14T22:13:20Z and each resource was stored 1 µs after the one before it.
    n = len(EXAMPLE_RESOURCES)
    stored_at = {res_id: n + i for i, (t, res_id, _, deleted) in enumerate(HAND) if t == "Appointment" and not deleted}
    cut = stored_at["d-instant"]
    instant = f"2023-11-14T22:13:20.{cut:06d}Z"
    assert ids(engine, "Appointment", [("_lastUpdated", instant)]) == {"d-instant"}
    assert ids(engine, "Appointment", [("_lastUpdated", f"ge{instant}")]) == {
        k for k, v in stored_at.items() if v >= cut
    }
    assert ids(engine, "Appointment", [("_lastUpdated", f"lt{instant}")]) == {
        k for k, v in stored_at.items() if v < cut
    }
    assert ids(engine, "Appointment", [("_lastUpdated", "2023-11-14T22:13:20Z")]) == set(stored_at)
    assert ids(engine, "Appointment", [("_lastUpdated", "2023-11-14T22:13:21Z")]) == set()


# -- order and paging ----------------------------------------------------------------------------------------


def test_sort_ascending_by_earliest_start_missing_last_ties_by_id(engine: Engine) -> None:
    _, result = search(engine, "Appointment", [("_sort", "date")])
    assert [m.res_id for m in result.matches] == [
        "d-two",
        "d-span",
        "d-day",
        "d-year",
        "d-open",
        "d-instant",
        "d-none",
    ]


def test_sort_descending_by_latest_end_missing_last(engine: Engine) -> None:
    _, result = search(engine, "Appointment", [("_sort", "-date")])
    assert [m.res_id for m in result.matches] == [
        "d-open",
        "d-two",
        "d-instant",
        "d-year",
        "d-span",
        "d-day",
        "d-none",
    ]


def test_sort_by_string_then_id(engine: Engine) -> None:
    _, result = search(engine, "HealthcareService", [("_sort", "-name,_id")])
    assert [m.res_id for m in result.matches] == ["s-munoz", "s-plain", "s-underscore", "s-percent"]


def test_default_order_is_last_updated(engine: Engine) -> None:
    _, result = search(engine, "Appointment", [])
    assert [m.res_id for m in result.matches] == [
        "d-day",
        "d-year",
        "d-span",
        "d-instant",
        "d-open",
        "d-two",
        "d-none",
    ]


def follow_pages(engine: Engine, res_type: str, params: list[tuple[str, str]]) -> tuple[list[str], int]:
    """Every page of a search, reached through the next links of its Bundles: ids in order, page count."""
    request = parse(res_type, params)
    seen: list[str] = []
    pages = 0
    while True:
        with engine.connect() as conn:
            result = run(conn, request)
        bundle = orjson.loads(searchset_bundle(request, result, BASE))
        pages += 1
        seen += [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        assert links["self"] == f"{BASE}/{res_type}?{request.query()}"
        if "next" not in links:
            assert not result.has_more
            return seen, pages
        prefix = f"{BASE}/{res_type}?"
        assert links["next"].startswith(prefix)
        request = parse(res_type, parse_qsl(links["next"][len(prefix) :]))


def test_paging_through_next_links_returns_every_match_once_in_order(engine: Engine) -> None:
    patient_id = of_type("Patient")[0]["id"]
    expected = [e["id"] for e in of_type("Encounter") if e["subject"]["reference"] == f"Patient/{patient_id}"]
    seen, pages = follow_pages(engine, "Encounter", [("patient", patient_id), ("_count", "37")])
    assert seen == expected  # loaded in file order, so last_updated order is file order
    assert pages == -(-len(expected) // 37)


def test_paging_with_sort_is_stable_and_complete(engine: Engine) -> None:
    patient_id = of_type("Patient")[0]["id"]
    encounters = [e for e in of_type("Encounter") if e["subject"]["reference"] == f"Patient/{patient_id}"]

    def end(e: dict[str, Any]) -> int:
        return date_range(e["period"]["end"])[1] if "end" in e["period"] else 2**62

    expected = [e["id"] for e in sorted(encounters, key=lambda e: (-end(e), e["id"]))]
    seen, _ = follow_pages(engine, "Encounter", [("patient", patient_id), ("_sort", "-date"), ("_count", "50")])
    assert seen == expected


def test_paging_all_conditions_sorted_by_code_has_no_duplicates_or_omissions(engine: Engine) -> None:
    seen, pages = follow_pages(engine, "Condition", [("_sort", "code"), ("_count", "100")])
    assert len(seen) == len(set(seen))
    assert set(seen) == {c["id"] for c in of_type("Condition")}
    assert pages == -(-len(seen) // 100)


def test_total_accurate_and_summary_count(engine: Engine) -> None:
    n = len(of_type("Encounter"))
    _, result = search(engine, "Encounter", [("_total", "accurate"), ("_count", "5")])
    assert (result.total, len(result.matches), result.has_more) == (n, 5, True)
    _, result = search(engine, "Encounter", [("_summary", "count")])
    assert (result.total, result.matches) == (n, [])
    _, result = search(engine, "Encounter", [("_count", "0")])
    assert (result.total, result.matches) == (n, [])
    _, result = search(engine, "Encounter", [("_count", "5")])
    assert result.total == n  # every page of a multi-page search tells the total
    _, result = search(engine, "Encounter", [("_count", "5"), ("_total", "none")])
    assert result.total is None  # unless _total=none asks for none
    _, result = search(engine, "Appointment", [("_count", "5"), ("_offset", "5")])
    assert (result.total, result.has_more) == (7, False)  # the last page tells the total for free


def test_offset_beyond_the_end_gives_an_empty_page(engine: Engine) -> None:
    _, result = search(engine, "Appointment", [("_offset", "50")])
    assert (result.matches, result.has_more, result.total) == ([], False, 7)


# -- _include / _revinclude ----------------------------------------------------------------------------------


def _refs(resource: dict[str, Any], element: str) -> list[tuple[str, str]]:
    value = resource.get(element, [])
    values = value if isinstance(value, list) else [value]
    return [tuple(v["reference"].split("/")) for v in values if "reference" in v]  # type: ignore[misc]


def test_include_adds_the_referenced_resources_once(engine: Engine) -> None:
    report = BY_KEY[("DiagnosticReport", "cardiology-report")]
    expected = {r for r in _refs(report, "result") if r in BY_KEY}
    request, result = search(
        engine, "DiagnosticReport", [("_id", "cardiology-report"), ("_include", "DiagnosticReport:result")]
    )
    included = [(r.res_type, r.res_id) for r in result.included]
    assert len(included) == len(set(included))
    assert set(included) == expected


def test_include_iterate_follows_has_member_of_included_observations(engine: Engine) -> None:
    panel = BY_KEY[("Observation", "PRAPARE-panel-example-93025-5")]  # a panel of panels
    direct = {r for r in _refs(panel, "hasMember") if r in BY_KEY}
    expected: set[tuple[str, str]] = set()
    frontier = list(direct)
    while frontier:
        expected |= set(frontier)
        frontier = [m for key in frontier for m in _refs(BY_KEY[key], "hasMember") if m in BY_KEY and m not in expected]
    assert expected > direct  # the example really needs iteration
    params = [("_id", panel["id"])]
    _, result = search(engine, "Observation", [*params, ("_include", "Observation:has-member")])
    assert {(r.res_type, r.res_id) for r in result.included} == direct
    _, result = search(engine, "Observation", [*params, ("_include:iterate", "Observation:has-member")])
    assert {(r.res_type, r.res_id) for r in result.included} == expected
    assert len(result.included) == len(expected)


def test_include_iterate_across_types(engine: Engine) -> None:
    encounter = BY_KEY[("Encounter", "example-1")]
    locations = [tuple(x["location"]["reference"].split("/")) for x in encounter["location"]]
    organizations = {
        tuple(BY_KEY[loc]["managingOrganization"]["reference"].split("/"))
        for loc in locations
        if "managingOrganization" in BY_KEY[loc]
    }
    assert organizations
    _, result = search(
        engine,
        "Encounter",
        [
            ("_id", "example-1"),
            ("_include", "Encounter:location"),
            ("_include:iterate", "Location:organization"),
        ],
    )
    assert {(r.res_type, r.res_id) for r in result.included} == set(locations) | organizations


def test_include_does_not_repeat_a_match(engine: Engine) -> None:
    panel = next(o for o in of_type("Observation") if o.get("hasMember"))
    members = [m for m in _refs(panel, "hasMember") if m in BY_KEY]
    first = members[0][1]
    _, result = search(
        engine, "Observation", [("_id", f"{panel['id']},{first}"), ("_include", "Observation:has-member")]
    )
    assert {m.res_id for m in result.matches} == {panel["id"], first}
    assert {(r.res_type, r.res_id) for r in result.included} == set(members) - {("Observation", first)}


def test_revinclude_adds_the_resources_that_refer_to_the_matches(engine: Engine) -> None:
    expected = {
        ("Observation", o["id"])
        for o in of_type("Observation")
        if o.get("subject", {}).get("reference") == "Patient/example"
    }
    assert len(expected) > 50
    _, result = search(engine, "Patient", [("_id", "example"), ("_revinclude", "Observation:patient")])
    included = [(r.res_type, r.res_id) for r in result.included]
    assert len(included) == len(set(included)) and set(included) == expected
    assert all(r.content and orjson.loads(r.content)["resourceType"] == "Observation" for r in result.included)
    assert not result.included_cut


def test_revinclude_beyond_its_bound_includes_the_first_by_id_and_says_some_were_left_out(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    everyone = sorted(
        o["id"] for o in of_type("Observation") if o.get("subject", {}).get("reference") == "Patient/example"
    )
    monkeypatch.setattr(search_rules, "MAX_INCLUDED", 7)
    _, result = search(engine, "Patient", [("_id", "example"), ("_revinclude", "Observation:patient")])
    assert [(r.res_type, r.res_id) for r in result.included] == [("Observation", i) for i in everyone[:7]]
    assert result.included_cut

    monkeypatch.setattr(search_rules, "MAX_INCLUDED", len(everyone))  # exactly as many as there are: none left out
    _, result = search(engine, "Patient", [("_id", "example"), ("_revinclude", "Observation:patient")])
    assert sorted(r.res_id for r in result.included) == everyone
    assert not result.included_cut


def test_include_beyond_its_bound_includes_the_first_by_type_and_id_and_says_some_were_left_out(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = BY_KEY[("DiagnosticReport", "cardiology-report")]
    expected = sorted(r for r in _refs(report, "result") if r in BY_KEY)
    assert len(expected) >= 2
    params = [("_id", "cardiology-report"), ("_include", "DiagnosticReport:result")]
    monkeypatch.setattr(search_rules, "MAX_INCLUDED", len(expected) - 1)
    request, result = search(engine, "DiagnosticReport", params)
    assert [(r.res_type, r.res_id) for r in result.included] == expected[:-1]
    assert result.included_cut
    bundle = orjson.loads(searchset_bundle(request, result, "http://x/fhir"))
    outcome = bundle["entry"][-1]
    assert outcome["search"] == {"mode": "outcome"}
    assert [(i["severity"], i["code"], i["expression"]) for i in outcome["resource"]["issue"]] == [
        ("warning", "too-costly", ["_include"])
    ]
    assert sum(e["search"]["mode"] == "include" for e in bundle["entry"]) == len(expected) - 1

    monkeypatch.setattr(search_rules, "MAX_INCLUDED", len(expected))
    request, result = search(engine, "DiagnosticReport", params)
    assert not result.included_cut
    assert all(
        e["search"]["mode"] != "outcome"
        for e in orjson.loads(searchset_bundle(request, result, "http://x/fhir"))["entry"]
    )


def test_include_wildcard_follows_every_reference_parameter(engine: Engine) -> None:
    _, result = search(engine, "Encounter", [("_id", "example-1"), ("_include", "Encounter:*")])
    encounter = BY_KEY[("Encounter", "example-1")]
    expected = {("Patient", encounter["subject"]["reference"].split("/")[1])}
    expected |= {tuple(x["location"]["reference"].split("/")) for x in encounter["location"]}  # type: ignore[misc]
    assert {(r.res_type, r.res_id) for r in result.included} >= expected


# -- the searchset Bundle ------------------------------------------------------------------------------------


def test_bundle_splices_the_stored_bytes_with_full_urls_modes_total_and_links(engine: Engine) -> None:
    request, result = search(
        engine,
        "DiagnosticReport",
        [
            ("_id", "cardiology-report,cbc"),
            ("_total", "accurate"),
            ("_include", "DiagnosticReport:result"),
            ("_count", "1"),
        ],
    )
    raw = searchset_bundle(request, result, BASE + "/")
    for stored in result.matches + result.included:
        assert stored.content is not None and stored.content in raw
    bundle = orjson.loads(raw)
    assert (bundle["resourceType"], bundle["type"], bundle["total"]) == ("Bundle", "searchset", 2)
    q = "_id=cardiology-report,cbc&_include=DiagnosticReport:result&_total=accurate&_count=1"
    assert bundle["link"] == [
        {"relation": "self", "url": f"{BASE}/DiagnosticReport?{q}"},
        {"relation": "first", "url": f"{BASE}/DiagnosticReport?{q}"},
        {"relation": "next", "url": f"{BASE}/DiagnosticReport?{q}&_cursor={result.next_cursor.encode()}"},
        {"relation": "last", "url": f"{BASE}/DiagnosticReport?{q}&_offset=1"},
    ]
    assert result.next_cursor is not None and result.next_cursor.res_id == result.matches[0].res_id
    modes = [(e["search"]["mode"], e["fullUrl"]) for e in bundle["entry"]]
    assert modes[0] == ("match", f"{BASE}/DiagnosticReport/{result.matches[0].res_id}")
    assert {m for m, _ in modes[1:]} == {"include"}
    assert [e["resource"] for e in bundle["entry"]] == [
        orjson.loads(r.content or b"") for r in result.matches + result.included
    ]


def test_bundle_previous_link_on_a_later_page(engine: Engine) -> None:
    request, result = search(engine, "Appointment", [("_count", "3"), ("_offset", "4")])
    links = {link["relation"]: link["url"] for link in orjson.loads(searchset_bundle(request, result, BASE))["link"]}
    assert links["previous"] == f"{BASE}/Appointment?_count=3&_offset=1"
    assert links["last"] == f"{BASE}/Appointment?_count=3&_offset=6"
    assert "next" not in links


def test_bundle_for_summary_count_has_total_and_no_entry(engine: Engine) -> None:
    request, result = search(engine, "Patient", [("_summary", "count")])
    bundle = orjson.loads(searchset_bundle(request, result, BASE))
    assert bundle == {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(of_type("Patient")) + 1,
        "link": [{"relation": "self", "url": f"{BASE}/Patient?_summary=count&_count=20"}],
    }


def test_elements_keep_mandatory_and_asked_elements_and_tag_subsetted(engine: Engine) -> None:
    request, result = search(
        engine,
        "Observation",
        [("_id", "blood-pressure"), ("_elements", "subject,effective"), ("_include", "Observation:subject")],
    )
    bundle = orjson.loads(searchset_bundle(request, result, BASE))
    resource = bundle["entry"][0]["resource"]
    source = BY_KEY[("Observation", "blood-pressure")]
    assert list(resource)[:3] == ["resourceType", "id", "meta"]
    assert set(resource) == {"resourceType", "id", "meta", "status", "code", "subject", "effectiveDateTime"}
    assert resource["subject"] == source["subject"]
    assert SUBSETTED in resource["meta"]["tag"]
    assert bundle["entry"][1]["resource"] == orjson.loads(result.included[0].content or b"")  # included in full


def test_summary_true_keeps_summary_elements_only(engine: Engine) -> None:
    source = of_type("Patient")[0]
    request, result = search(engine, "Patient", [("_id", source["id"]), ("_summary", "true")])
    resource = orjson.loads(searchset_bundle(request, result, BASE))["entry"][0]["resource"]
    dropped = {"text", "extension", "communication", "maritalStatus", "multipleBirthBoolean"}
    assert dropped <= set(source)
    assert set(resource) == set(source) - dropped
    assert {k: v for k, v in resource.items() if k != "meta"} == {
        k: source[k] for k in set(source) - dropped - {"meta"}
    }
    assert resource["meta"] == {**source["meta"], "tag": [SUBSETTED]}


@pytest.mark.parametrize(("summary", "kept"), [("text", {"text"}), ("data", {"name", "communication", "extension"})])
def test_summary_text_and_data(engine: Engine, summary: str, kept: set[str]) -> None:
    source = of_type("Patient")[0]
    request, result = search(engine, "Patient", [("_id", source["id"]), ("_summary", summary)])
    resource = orjson.loads(searchset_bundle(request, result, BASE))["entry"][0]["resource"]
    assert kept <= set(resource)
    if summary == "text":
        assert set(resource) == {"resourceType", "id", "meta", "text"}
    else:
        assert set(resource) == set(source) - {"text"}
    assert resource["meta"]["tag"].count(SUBSETTED) == 1


def test_lenient_bundle_reports_ignored_parameters_and_leaves_them_out_of_links() -> None:
    request = parse("Patient", [("nope", "1"), ("gender", "male")], lenient=True)
    bundle = orjson.loads(searchset_bundle(request, SearchResult(), BASE))
    assert bundle["link"][0] == {"relation": "self", "url": f"{BASE}/Patient?gender=male&_count=20"}
    assert bundle["entry"] == [
        {
            "resource": {
                "resourceType": "OperationOutcome",
                "issue": [
                    {
                        "severity": "warning",
                        "code": "not-supported",
                        "diagnostics": "Parameter 'nope' was ignored",
                        "expression": ["nope"],
                    }
                ],
            },
            "search": {"mode": "outcome"},
        }
    ]


def test_empty_search_has_no_entry_array() -> None:
    request = parse("Patient", [])
    bundle = orjson.loads(searchset_bundle(request, SearchResult(total=0), BASE))
    assert "entry" not in bundle and bundle["total"] == 0


def test_subset_keeps_primitive_extensions_of_kept_elements() -> None:
    content = orjson.dumps(
        {
            "resourceType": "Patient",
            "id": "x",
            "birthDate": "2000",
            "_birthDate": {"extension": []},
            "gender": "male",
            "_gender": {"id": "g"},
        }
    )
    request = parse("Patient", [("_elements", "birthDate")])
    stored = StoredResource("Patient", "x", 1, T0, False, content)
    bundle = orjson.loads(searchset_bundle(request, SearchResult(matches=[stored]), BASE))
    resource = bundle["entry"][0]["resource"]
    assert resource == {
        "resourceType": "Patient",
        "id": "x",
        "meta": {"tag": [SUBSETTED]},
        "birthDate": "2000",
        "_birthDate": {"extension": []},
    }


@pytest.mark.parametrize("extra", [[], [("_elements", "subject")], [("_summary", "true")], [("_summary", "count")]])
def test_bundle_is_valid_fhir(engine: Engine, extra: list[tuple[str, str]]) -> None:
    from fhir.resources.R4B.bundle import Bundle

    patient_id = of_type("Patient")[0]["id"]
    params = [("patient", patient_id), ("_include", "Encounter:subject"), ("_count", "3"), ("_total", "accurate")]
    request, result = search(engine, "Encounter", params + extra)
    bundle = Bundle.model_validate_json(searchset_bundle(request, result, BASE))
    assert bundle.type == "searchset" and bundle.total == len(
        [e for e in of_type("Encounter") if e["subject"]["reference"] == f"Patient/{patient_id}"]
    )
    assert len(bundle.entry or []) == (0 if extra == [("_summary", "count")] else 4)
