"""Invariant results are remembered by the members their expression names (r4/profiles.py _evaluate): the same
answer as evaluating the whole object, whatever was evaluated before."""

from __future__ import annotations

from typing import Any

import pytest
from fhirpathpy.engine.nodes import ResourceNode

from iop_fhir.r4 import profiles

US_CORE_2 = "(component.empty() and hasMember.empty()) implies (dataAbsentReason.exists() or value.exists())"
US_CORE_3 = "value.ofType(Quantity).system.empty() or value.ofType(Quantity).system = 'http://unitsofmeasure.org'"
US_CORE_1 = "$this is DateTime implies $this.toString().length() >= 10"
WHOLE = "$this.exists() and children().count() > 2"


def whole(expression: str, value: Any, type_code: str) -> list[Any]:
    return profiles._compiled(expression)(ResourceNode.create_node(value, type_code))


def observation(n: int, **members: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"o{n}",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": f"Patient/p{n}"},
        **members,
    }


CASES = [
    (US_CORE_2, {"valueCodeableConcept": {"text": "negative"}}),
    (US_CORE_2, {}),
    (US_CORE_2, {"dataAbsentReason": {"text": "asked"}}),
    (US_CORE_2, {"hasMember": [{"reference": "Observation/x"}]}),
    (US_CORE_3, {"valueQuantity": {"value": 0.0, "unit": "g/dL", "system": "http://unitsofmeasure.org"}}),
    (US_CORE_3, {"valueQuantity": {"value": 0.0, "unit": "g/dL", "system": "urn:other"}}),
    (US_CORE_3, {"valueString": "x"}),
    (WHOLE, {}),
]


@pytest.mark.parametrize("expression, members", CASES)
def test_a_remembered_result_equals_the_result_on_the_whole_object(expression: str, members: dict[str, Any]) -> None:
    profiles._RESULTS.clear()
    for n in range(3):  # the first evaluates, the others may be remembered
        resource = observation(n, **members)
        assert profiles._evaluate(expression, resource, "Observation") == whole(expression, resource, "Observation")


def test_a_result_remembered_for_one_value_is_not_given_for_another() -> None:
    profiles._RESULTS.clear()
    good = observation(1, valueQuantity={"value": 1, "system": "http://unitsofmeasure.org"})
    bad = observation(1, valueQuantity={"value": 1, "system": "urn:other"})
    assert profiles._evaluate(US_CORE_3, good, "Observation") == [True]
    assert profiles._evaluate(US_CORE_3, bad, "Observation") == [False]
    assert profiles._evaluate(US_CORE_2, observation(2), "Observation") == [False]


@pytest.mark.parametrize("value", ["2026-01-12", "2026", "2026-01-12T18:00:00-05:00"])
def test_primitive_values_are_remembered_as_they_are(value: str) -> None:
    profiles._RESULTS.clear()
    for _ in range(2):
        assert profiles._evaluate(US_CORE_1, value, "dateTime") == whole(US_CORE_1, value, "dateTime")


def test_expressions_that_may_reach_any_member_are_never_cut_down() -> None:
    assert profiles._names(WHOLE) is None
    assert profiles._names("descendants().where(x)") is None
    assert profiles._names("%resource.id.exists()") is None
    assert profiles._names(US_CORE_2) is not None and {"component", "hasMember", "value"} <= profiles._names(US_CORE_2)
