"""Search through the HTTP API end to end (https://hl7.org/fhir/R4/search.html), on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
import pytest
from flask.testing import FlaskClient

from iop_fhir.r4 import search

FHIR = "application/fhir+json"
LOINC = "http://loinc.org"
MRN = "urn:oid:2.16.840.1.113883.19.5"


def create(client: FlaskClient, resource: dict[str, Any]) -> str:
    response = client.post(
        f"/fhir/{resource['resourceType']}", data=orjson.dumps(resource), headers={"Content-Type": FHIR}
    )
    assert response.status_code == 201, response.get_json()
    res_id: str = response.get_json()["id"]
    return res_id


def observation(patient: str, code: str, value: float, when: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code, "display": f"Score {code}"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": "{score}", "system": "http://unitsofmeasure.org", "code": "{score}"},
        **extra,
    }


@pytest.fixture
def program(client: FlaskClient) -> dict[str, str]:
    """Two patients with PHQ-9 (44261-6) and GAD-7 (70274-6) totals over three visits."""
    ids = {
        "reyes": create(
            client,
            {
                "resourceType": "Patient",
                "identifier": [{"system": MRN, "value": "MRN-448812"}],
                "name": [{"family": "Reyes", "given": ["Jordan"]}],
                "gender": "female",
                "birthDate": "1987-04-12",
            },
        ),
        "muller": create(
            client,
            {
                "resourceType": "Patient",
                "identifier": [{"system": MRN, "value": "MRN-552310"}],
                "name": [{"family": "Müller", "given": ["Kai"]}],
                "gender": "male",
                "birthDate": "1979-11-02",
            },
        ),
    }
    ids["phq_jan"] = create(client, observation(ids["reyes"], "44261-6", 12, "2026-01-05T10:30:00-05:00"))
    ids["phq_feb"] = create(client, observation(ids["reyes"], "44261-6", 8, "2026-02-02T10:30:00-05:00"))
    ids["gad_jan"] = create(client, observation(ids["reyes"], "70274-6", 9, "2026-01-05T10:40:00-05:00"))
    ids["phq_kai"] = create(client, observation(ids["muller"], "44261-6", 15, "2026-01-20T09:00:00-05:00"))
    return ids


def ids_of(client: FlaskClient, query: str, mode: str = "match") -> list[str]:
    response = client.get(f"/fhir/{query}")
    assert response.status_code == 200, response.get_json()
    bundle = response.get_json()
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode]


def test_token_with_system_and_code_finds_exactly_the_matches(client: FlaskClient, program: dict[str, str]) -> None:
    found = ids_of(client, f"Observation?code={LOINC}|44261-6")
    assert sorted(found) == sorted([program["phq_jan"], program["phq_feb"], program["phq_kai"]])


def test_comma_is_or_and_repetition_is_and(client: FlaskClient, program: dict[str, str]) -> None:
    either = ids_of(client, "Observation?code=44261-6,70274-6&subject=Patient/" + program["reyes"])
    assert sorted(either) == sorted([program["phq_jan"], program["phq_feb"], program["gad_jan"]])
    both = ids_of(client, "Observation?date=ge2026-01-01&date=lt2026-02-01&code=44261-6")
    assert sorted(both) == sorted([program["phq_jan"], program["phq_kai"]])


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("value-quantity=gt10", ["phq_jan", "phq_kai"]),
        ("value-quantity=le9", ["phq_feb", "gad_jan"]),
        ("value-quantity=12", ["phq_jan"]),
        ("value-quantity=ne12&code=44261-6", ["phq_feb", "phq_kai"]),
        ("date=2026-01", ["phq_jan", "gad_jan", "phq_kai"]),
        ("date=sa2026-01-31", ["phq_feb"]),
        ("date=eb2026-01-06", ["phq_jan", "gad_jan"]),
        ("code:not=44261-6", ["gad_jan"]),
        ("code:text=score 7027", ["gad_jan"]),
    ],
)
def test_prefixes_and_modifiers(client: FlaskClient, program: dict[str, str], query: str, expected: list[str]) -> None:
    assert sorted(ids_of(client, f"Observation?{query}")) == sorted(program[k] for k in expected)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("name=muller", ["muller"]),  # case- and accent-insensitive prefix
        ("name=rey", ["reyes"]),
        ("family:exact=Müller", ["muller"]),
        ("family:exact=müller", []),
        ("family:contains=ULL", ["muller"]),
        ("identifier=MRN-552310", ["muller"]),
        (f"identifier={MRN}|MRN-448812", ["reyes"]),
        ("gender=female", ["reyes"]),
        ("birthdate=lt1980", ["muller"]),
        ("deceased=false", ["reyes", "muller"]),  # R4: Patient.deceased.exists() and Patient.deceased != false
        ("general-practitioner:missing=true", ["reyes", "muller"]),
        ("general-practitioner:missing=false", []),
    ],
)
def test_patient_string_token_date_and_missing(
    client: FlaskClient, program: dict[str, str], query: str, expected: list[str]
) -> None:
    assert sorted(ids_of(client, f"Patient?{query}")) == sorted(program[k] for k in expected)


def test_chained_parameter_finds_observations_by_patient_identifier(
    client: FlaskClient, program: dict[str, str]
) -> None:
    found = ids_of(client, f"Observation?subject:Patient.identifier={MRN}|MRN-552310")
    assert found == [program["phq_kai"]]
    assert ids_of(client, "Observation?patient.family=reyes&code=70274-6") == [program["gad_jan"]]


def test_include_and_revinclude_add_the_linked_resources(client: FlaskClient, program: dict[str, str]) -> None:
    query = f"Observation?_id={program['phq_kai']}&_include=Observation:subject"
    assert ids_of(client, query) == [program["phq_kai"]]
    assert ids_of(client, query, mode="include") == [program["muller"]]
    rev = f"Patient?_id={program['muller']}&_revinclude=Observation:subject"
    assert ids_of(client, rev, mode="include") == [program["phq_kai"]]


def test_sort_descending_by_date(client: FlaskClient, program: dict[str, str]) -> None:
    found = ids_of(client, "Observation?code=44261-6&_sort=-date")
    assert found == [program["phq_feb"], program["phq_kai"], program["phq_jan"]]


def test_paging_follows_next_links_without_duplicates_or_omissions(
    client: FlaskClient, program: dict[str, str]
) -> None:
    response = client.get("/fhir/Observation?_count=1&_sort=date&_total=accurate")
    bundle = response.get_json()
    assert bundle["total"] == 4
    seen = [bundle["entry"][0]["resource"]["id"]]
    while following := next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None):
        url = urlsplit(following)
        assert url.path == "/fhir/Observation"
        bundle = client.get(f"{url.path}?{url.query}").get_json()
        seen += [e["resource"]["id"] for e in bundle["entry"]]
    assert seen == [program["phq_jan"], program["gad_jan"], program["phq_kai"], program["phq_feb"]]
    # A page reached by cursor has no previous link; one asked for by _offset keeps it.
    assert "previous" not in [link["relation"] for link in bundle["link"]]
    bundle = client.get("/fhir/Observation?_count=1&_sort=date&_offset=3").get_json()
    assert [e["resource"]["id"] for e in bundle["entry"]] == [program["phq_feb"]]
    previous = next(link["url"] for link in bundle["link"] if link["relation"] == "previous")
    assert dict(parse_qsl(urlsplit(previous).query))["_offset"] == "2"


def test_every_page_of_a_multi_page_search_carries_the_total_and_a_last_link(
    client: FlaskClient, program: dict[str, str]
) -> None:
    bundle = client.get("/fhir/Observation?_count=1&_sort=date").get_json()
    pages = 1
    while True:
        assert bundle["total"] == 4
        assert dict(parse_qsl(urlsplit(link(bundle, "last")).query))["_offset"] == "3"
        following = next((lk["url"] for lk in bundle["link"] if lk["relation"] == "next"), None)
        if following is None:
            break
        url = urlsplit(following)
        bundle = client.get(f"{url.path}?{url.query}").get_json()
        pages += 1
    assert pages == 4
    beyond = client.get("/fhir/Observation?_count=1&_offset=9").get_json()
    assert (beyond["total"], beyond.get("entry")) == (4, None)


def test_a_total_nobody_asked_for_is_left_out_above_the_count_limit_and_counted_when_asked(
    client: FlaskClient, program: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(search, "COUNT_LIMIT", 3)  # 4 Observations match
    for query in ("_count=1", "_count=1&_total=estimate"):
        bundle = client.get(f"/fhir/Observation?{query}").get_json()
        assert "total" not in bundle
        assert {lk["relation"] for lk in bundle["link"]} == {"self", "first", "next"}
        seen = len(bundle["entry"])
        while (following := next((lk["url"] for lk in bundle["link"] if lk["relation"] == "next"), None)) is not None:
            bundle = client.get(following[following.index("/fhir/") :]).get_json()
            seen += len(bundle.get("entry", []))
        assert seen == 4  # every match is still served, page by page
    for query in ("_count=1&_total=accurate", "_count=1&_totalMethod=count", "_summary=count", "_count=0"):
        assert client.get(f"/fhir/Observation?{query}").get_json()["total"] == 4, query
    assert client.get("/fhir/Observation?code=44261-6&_count=1").get_json()["total"] == 3  # within the limit


def test_a_history_with_more_versions_than_are_counted_has_no_total_and_pages_to_the_end(
    client: FlaskClient, program: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(search, "COUNT_LIMIT", 3)
    bundle = client.get("/fhir/Observation/_history?_count=1").get_json()
    assert "total" not in bundle
    seen = [e["resource"]["id"] for e in bundle["entry"]]
    while (following := next((lk["url"] for lk in bundle["link"] if lk["relation"] == "next"), None)) is not None:
        bundle = client.get(following[following.index("/fhir/") :]).get_json()
        seen += [e["resource"]["id"] for e in bundle.get("entry", [])]
    assert sorted(seen) == sorted(program[k] for k in ("phq_jan", "phq_feb", "gad_jan", "phq_kai"))


def test_total_none_leaves_the_total_out_of_every_page(client: FlaskClient, program: dict[str, str]) -> None:
    bundle = client.get("/fhir/Observation?_count=1&_total=none").get_json()
    assert "total" not in bundle
    assert "last" not in {lk["relation"] for lk in bundle["link"]}


def link(bundle: dict[str, Any], relation: str) -> str:
    url: str = next(lk["url"] for lk in bundle["link"] if lk["relation"] == relation)
    return url


def test_summary_count_returns_only_the_total(client: FlaskClient, program: dict[str, str]) -> None:
    bundle = client.get("/fhir/Observation?code=44261-6&_summary=count").get_json()
    assert bundle["total"] == 3
    assert "entry" not in bundle


def test_elements_trims_to_the_named_elements_and_marks_subsetted(client: FlaskClient, program: dict[str, str]) -> None:
    bundle = client.get(f"/fhir/Patient?_id={program['reyes']}&_elements=gender").get_json()
    resource = bundle["entry"][0]["resource"]
    assert set(resource) == {"resourceType", "id", "meta", "gender"}
    assert {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"} in [
        {k: t[k] for k in ("system", "code")} for t in resource["meta"]["tag"]
    ]


def test_post_search_with_a_form_body_equals_get(client: FlaskClient, program: dict[str, str]) -> None:
    response = client.post(
        "/fhir/Observation/_search",
        data="code=70274-6",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200
    assert [e["resource"]["id"] for e in response.get_json()["entry"]] == [program["gad_jan"]]


def test_last_updated_and_id(client: FlaskClient, program: dict[str, str]) -> None:
    both = ids_of(client, f"Patient?_id={program['reyes']},{program['muller']}&_lastUpdated=gt2020-01-01")
    assert sorted(both) == sorted([program["reyes"], program["muller"]])
    assert ids_of(client, "Patient?_lastUpdated=lt2020-01-01") == []


@pytest.mark.parametrize(
    ("query", "expression"),
    [
        ("Observation?value-quantity=gtX", "value-quantity"),
        ("Observation?date=2026-13-45", "date"),
        ("Observation?code:bogus=1", "code:bogus"),
        ("Observation?_sort=nonsense", "_sort"),
        ("Observation?_count=-1", "_count"),
    ],
)
def test_malformed_search_is_a_400_naming_the_parameter(client: FlaskClient, query: str, expression: str) -> None:
    response = client.get(f"/fhir/{query}")
    assert response.status_code == 400
    outcome = response.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"] == [expression]


def test_deleted_resources_never_match(client: FlaskClient, program: dict[str, str]) -> None:
    assert client.delete(f"/fhir/Observation/{program['gad_jan']}").status_code == 204
    assert ids_of(client, "Observation?code=70274-6") == []


# -- compartment search: Patient/{id}/{type} (https://hl7.org/fhir/R4/compartmentdefinition-patient.html) ------


def test_patient_compartment_search_finds_only_that_patients_resources(
    client: FlaskClient, program: dict[str, str]
) -> None:
    reyes = program["reyes"]
    found = ids_of(client, f"Patient/{reyes}/Observation?_sort=date")
    assert found == [program["phq_jan"], program["gad_jan"], program["phq_feb"]]
    assert ids_of(client, f"Patient/{program['muller']}/Observation") == [program["phq_kai"]]
    assert ids_of(client, f"Patient/{reyes}/Patient") == [reyes]


def test_patient_compartment_search_applies_the_types_search_parameters(
    client: FlaskClient, program: dict[str, str]
) -> None:
    found = ids_of(client, f"Patient/{program['reyes']}/Observation?code=44261-6&_sort=date")
    assert found == [program["phq_jan"], program["phq_feb"]]
    response = client.get(f"/fhir/Patient/{program['reyes']}/Observation?bogus=1")
    assert response.status_code == 400
    assert response.get_json()["issue"][0]["expression"] == ["bogus"]


def test_patient_compartment_search_pages_with_links_under_the_compartment(
    client: FlaskClient, program: dict[str, str]
) -> None:
    bundle = client.get(f"/fhir/Patient/{program['reyes']}/Observation?_count=2").get_json()
    assert bundle["total"] == 3
    following = urlsplit(link(bundle, "next"))
    assert following.path == f"/fhir/Patient/{program['reyes']}/Observation"
    rest = client.get(f"{following.path}?{following.query}").get_json()
    assert len(rest["entry"]) == 1


def test_patient_compartment_search_of_an_unknown_patient_is_404(client: FlaskClient, program: dict[str, str]) -> None:
    response = client.get("/fhir/Patient/never-existed/Observation")
    assert response.status_code == 404
    assert response.get_json()["resourceType"] == "OperationOutcome"
    assert response.get_json()["issue"][0]["code"] == "not-found"


def test_compartment_search_of_a_type_outside_the_compartment_or_another_compartment_is_refused(
    client: FlaskClient, program: dict[str, str]
) -> None:
    outside = client.get(f"/fhir/Patient/{program['reyes']}/Organization")
    assert outside.status_code == 400
    assert outside.get_json()["issue"][0]["code"] == "not-supported"
    other = client.get("/fhir/Encounter/x/Observation")
    assert other.status_code == 404
    assert other.get_json()["issue"][0]["code"] == "not-supported"


def test_patient_compartment_is_declared_in_the_capability_statement(client: FlaskClient) -> None:
    rest = client.get("/fhir/metadata").get_json()["rest"][0]
    assert rest["compartment"] == ["http://hl7.org/fhir/CompartmentDefinition/patient"]


def test_a_total_counted_from_one_index_counts_each_live_match_once(
    client: FlaskClient, program: dict[str, str]
) -> None:
    both = observation(program["muller"], "44261-6", 3, "2026-03-01T09:00:00-05:00")
    both["code"]["coding"].append({"system": LOINC, "code": "70274-6"})
    both_id = create(client, both)
    gone = create(client, observation(program["muller"], "44261-6", 4, "2026-03-02T09:00:00-05:00"))
    assert client.delete(f"/fhir/Observation/{gone}").status_code == 204
    moved = program["phq_kai"]
    changed = observation(program["muller"], "70274-6", 15, "2026-01-20T09:00:00-05:00")
    assert (
        client.put(
            f"/fhir/Observation/{moved}", data=orjson.dumps({**changed, "id": moved}), headers={"Content-Type": FHIR}
        ).status_code
        == 200
    )
    queries = {
        "code=44261-6,70274-6": 5,  # phq_jan, phq_feb, gad_jan, phq_kai, both: each once, the deleted one not
        "code=44261-6": 3,  # phq_jan, phq_feb, both; no longer phq_kai
        f"patient=Patient/{program['muller']}": 2,
        "patient.family=Müller": 2,  # a chain
        "value-quantity=ge9": 3,
        "date=ge2026-02": 2,  # phq_feb, both; not the deleted one
        "subject:missing=false": 5,
    }
    for query, expected in queries.items():
        for total in ("accurate", "estimate"):
            bundle = client.get(f"/fhir/Observation?{query}&_total={total}&_count=1").get_json()
            assert bundle["total"] == expected, (query, total)
        assert client.get(f"/fhir/Observation?{query}&_summary=count").get_json()["total"] == expected
    assert both_id in ids_of(client, "Observation?code=44261-6,70274-6&_count=100")


def test_filters_meet_as_each_one_says_when_read_as_one_intersection(
    client: FlaskClient, program: dict[str, str]
) -> None:
    both = observation(program["muller"], "44261-6", 3, "2026-03-01T09:00:00-05:00")
    both["code"]["coding"].append({"system": LOINC, "code": "70274-6"})
    both_id = create(client, both)
    queries = {
        "code=44261-6&code=70274-6": [both_id],  # two codings of one resource, each matching one filter
        f"code=44261-6&patient=Patient/{program['muller']}": sorted([program["phq_kai"], both_id]),
        "date=ge2026-01-10&date=lt2026-02-10": sorted([program["phq_feb"], program["phq_kai"]]),
        "date=ge2026-01-10&date=lt2026-02-10&value-quantity=gt10": [program["phq_kai"]],
        "code=44261-6&subject:missing=false&value-quantity=lt10": sorted([program["phq_feb"], both_id]),
    }
    for query, expected in queries.items():
        assert sorted(ids_of(client, f"Observation?{query}&_count=100")) == expected, query
        counted = client.get(f"/fhir/Observation?{query}&_summary=count").get_json()
        assert counted["total"] == len(expected), query
