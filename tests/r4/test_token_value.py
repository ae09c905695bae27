"""Token search values built from data (r4/search.py token_value) survive the search parser unchanged."""

from __future__ import annotations

from iop_fhir.r4 import search


def test_a_token_value_escapes_the_search_separators_in_both_parts() -> None:
    assert search.token_value("urn:a|b", "1,2$3\\4") == "urn:a\\|b|1\\,2\\$3\\\\4"
    parsed = search.parse("Patient", [("identifier", search.token_value("urn:a|b", "x,y"))])
    [value] = parsed.filters[0].values
    assert (value.system, value.code) == ("urn:a|b", "x,y")
