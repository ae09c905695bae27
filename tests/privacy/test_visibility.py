"""The Part 2 visibility predicate (privacy/restriction.py) on both databases: who a resource belongs to, labels that
need a patient, counseling notes, and a partner with more consented patients than a statement takes parameters."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from iop_fhir.fhir.repository import Repository
from iop_fhir.privacy.restriction import Restriction
from iop_fhir.r4.search import parse
from iop_fhir.store.sql import SqlStore

ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"


def labelled(resource: dict[str, Any], *codes: str) -> dict[str, Any]:
    return {**resource, "meta": {"security": [{"system": ACT, "code": code} for code in codes]}}


@pytest.fixture
def repository(db_url: str) -> Any:
    store = SqlStore(db_url)
    repository = Repository(store)
    with store.write() as tx:
        for patient in ("a", "b"):
            repository.update_in(tx, "Patient", patient, labelled({"resourceType": "Patient", "id": patient}, "SUD"))
        observations = {
            "of-a": {"subject": {"reference": "Patient/a"}},
            "of-b": {"subject": {"reference": "Patient/b"}},
            "of-a-and-b": {"subject": {"reference": "Patient/a"}, "performer": [{"reference": "Patient/b"}]},
            "note-of-a": labelled({"subject": {"reference": "Patient/a"}}, "SUD", "PSYTHPN"),
            "labelled-of-nobody": labelled({}, "42CFRPart2"),
            "unlabelled-of-nobody": {},
        }
        for res_id, extra in observations.items():
            body = {"resourceType": "Observation", "id": res_id, "status": "final", "code": {"text": "x"}, **extra}
            repository.update_in(tx, "Observation", res_id, body)
    yield repository
    store.close()


def visible(repository: Repository, res_type: str, restriction: Restriction) -> set[str]:
    request = replace(parse(res_type, [("_count", "100")]), restriction=restriction)
    return {res.res_id for res in repository.store.search(request).matches}


def test_a_resource_is_visible_only_when_every_patient_it_refers_to_is_permitted(repository: Repository) -> None:
    only_a = Restriction(frozenset({"a"}))
    assert visible(repository, "Observation", only_a) == {"of-a", "unlabelled-of-nobody"}
    assert visible(repository, "Patient", only_a) == {"a"}
    both = Restriction(frozenset({"a", "b"}))
    assert visible(repository, "Observation", both) == {"of-a", "of-b", "of-a-and-b", "unlabelled-of-nobody"}


def test_counseling_notes_need_the_patient_among_the_note_patients(repository: Repository) -> None:
    notes = Restriction(frozenset({"a"}), frozenset({"a"}))
    assert "note-of-a" in visible(repository, "Observation", notes)


def test_nobody_permitted_sees_only_unlabelled_resources_of_no_patient(repository: Repository) -> None:
    assert visible(repository, "Observation", Restriction()) == {"unlabelled-of-nobody"}
    assert visible(repository, "Patient", Restriction()) == set()


def test_forty_thousand_consented_patients_fit_in_one_search(repository: Repository) -> None:
    many = frozenset({"a", *(f"p{i:05d}" for i in range(40_000))})
    assert visible(repository, "Patient", Restriction(many)) == {"a"}


def test_an_id_that_is_not_a_fhir_id_is_bound_as_a_parameter_never_rendered(repository: Repository) -> None:
    odd = Restriction(frozenset({"a", "x'); DROP TABLE resources; --"}))
    assert visible(repository, "Patient", odd) == {"a"}
    assert visible(repository, "Patient", Restriction(frozenset({"a", "b"}))) == {"a", "b"}


def test_a_resource_moved_to_another_patient_is_decided_on_the_patient_it_now_belongs_to(
    repository: Repository,
) -> None:
    store = repository.store
    moved = {"resourceType": "Observation", "id": "of-a", "status": "final", "code": {"text": "x"}}
    with store.write() as tx:
        repository.update_in(tx, "Observation", "of-a", {**moved, "subject": {"reference": "Patient/b"}})
    assert "of-a" not in visible(repository, "Observation", Restriction(frozenset({"a"})))
    assert "of-a" in visible(repository, "Observation", Restriction(frozenset({"b"})))
    with store.write() as tx:
        repository.update_in(tx, "Observation", "of-a", labelled({**moved, "subject": {"reference": "Patient/b"}}))
    with store.write() as tx:  # the labels it lost no longer count, the patient it gained does
        repository.update_in(tx, "Observation", "of-a", {**moved, "performer": [{"reference": "Patient/a"}]})
    assert "of-a" in visible(repository, "Observation", Restriction(frozenset({"a"})))


def test_a_resource_of_two_patients_or_of_a_patient_named_only_elsewhere_needs_every_one_permitted(
    repository: Repository,
) -> None:
    body = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
    elsewhere = {"reference": "Patient?identifier=urn:oid:2.16.840.1.113883.4.1|000-00-0000"}  # names no local id
    with repository.store.write() as tx:
        repository.update_in(tx, "Observation", "of-nowhere", {**body, "id": "of-nowhere", "subject": elsewhere})
        group = {"resourceType": "Group", "id": "pair", "type": "person", "actual": True}
        members = [{"entity": {"reference": "Patient/a"}}, {"entity": {"reference": "Patient/b"}}]
        repository.update_in(tx, "Group", "pair", {**group, "member": members})
    every = Restriction(frozenset({"a", "b"}))
    assert "of-nowhere" not in visible(repository, "Observation", every)
    assert visible(repository, "Group", Restriction(frozenset({"a"}))) == set()
    assert visible(repository, "Group", every) == {"pair"}


SSN = {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "000-00-0001"}


@pytest.mark.parametrize(
    ("case", "extra"),
    [
        ("subject by identifier only", {"subject": {"identifier": SSN}}),
        ("subject by identifier, typed Patient", {"subject": {"type": "Patient", "identifier": SSN}}),
        ("performer by identifier, typed Patient", {"performer": [{"type": "Patient", "identifier": SSN}]}),
        ("subject typed Patient by display", {"subject": {"type": "Patient", "display": "J. Doe"}}),
        ("subject an unresolved urn:uuid", {"subject": {"reference": "urn:uuid:0b0a6b8e-0e55-4a39-9a67-2f4f1f4b5c01"}}),
        ("subject another server's URL", {"subject": {"reference": "https://elsewhere.example/people/77"}}),
        (
            "subject a contained Patient",
            {"contained": [{"resourceType": "Patient", "id": "p1"}], "subject": {"reference": "#p1"}},
        ),
        (
            "subject by identifier beside a permitted one",
            {"subject": {"identifier": SSN}, "performer": [{"reference": "Patient/a"}]},
        ),
    ],
)
def test_an_unlabelled_resource_of_a_patient_named_by_no_local_id_is_hidden_from_every_partner(
    repository: Repository, case: str, extra: dict[str, Any]
) -> None:
    body = {"resourceType": "Observation", "id": "of-someone", "status": "final", "code": {"text": "x"}, **extra}
    with repository.store.write() as tx:
        repository.update_in(tx, "Observation", "of-someone", body)
    for permitted in (Restriction(), Restriction(frozenset({"a", "b"}))):
        assert "of-someone" not in visible(repository, "Observation", permitted), case
    assert "of-someone" in {r.res_id for r in repository.store.search(parse("Observation", [])).matches}


@pytest.mark.parametrize(
    ("case", "extra"),
    [
        ("performer by display only", {"performer": [{"display": "Dr. Example"}]}),
        (
            "performer a contained Practitioner",
            {
                "contained": [{"resourceType": "Practitioner", "id": "pr1"}],
                "performer": [{"reference": "#pr1"}],
            },
        ),
        ("focus by identifier only (not a Patient compartment parameter)", {"focus": [{"identifier": SSN}]}),
        ("device by identifier, typed Device", {"device": {"type": "Device", "identifier": SSN}}),
    ],
)
def test_a_reference_that_cannot_be_to_a_patient_leaves_the_resource_to_its_own_patient(
    repository: Repository, case: str, extra: dict[str, Any]
) -> None:
    body = {
        "resourceType": "Observation",
        "id": "of-a-too",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": "Patient/a"},
        **extra,
    }
    with repository.store.write() as tx:
        repository.update_in(tx, "Observation", "of-a-too", body)
    assert "of-a-too" in visible(repository, "Observation", Restriction(frozenset({"a"}))), case
    assert "of-a-too" not in visible(repository, "Observation", Restriction(frozenset({"b"}))), case


@pytest.mark.parametrize(
    ("case", "extra"),
    [
        (
            "an extension naming Patient/b",
            {"extension": [{"url": "https://example.org/fhir/witness", "valueReference": {"reference": "Patient/b"}}]},
        ),
        (
            "a contained Observation about Patient/b",
            {
                "contained": [
                    {
                        "resourceType": "Observation",
                        "id": "inner",
                        "status": "final",
                        "code": {"text": "x"},
                        "subject": {"reference": "Patient/b"},
                    }
                ],
                "hasMember": [{"reference": "#inner"}],
            },
        ),
        ("a contained Patient referred to by no parameter", {"contained": [{"resourceType": "Patient", "id": "p9"}]}),
    ],
)
def test_a_patient_named_where_no_parameter_indexes_counts_as_one_the_resource_belongs_to(
    repository: Repository, case: str, extra: dict[str, Any]
) -> None:
    body = {
        "resourceType": "Observation",
        "id": "of-a-naming-another",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": "Patient/a"},
        **extra,
    }
    with repository.store.write() as tx:
        repository.update_in(tx, "Observation", "of-a-naming-another", body)
    assert "of-a-naming-another" not in visible(repository, "Observation", Restriction(frozenset({"a"}))), case
    named_b = "Patient/b" in str(extra)
    both = "of-a-naming-another" in visible(repository, "Observation", Restriction(frozenset({"a", "b"})))
    assert both is named_b, case  # with b permitted too it shows, unless it holds a Patient of no local id
