"""The vendored R4 data is what tools/vendor_r4.py builds from the HL7 definitions (setup-peers installs them)."""

from __future__ import annotations

import pytest

from tools import profile_build, vendor_r4


@pytest.mark.peers
@pytest.mark.skipif(not profile_build.DEFINITIONS.exists(), reason="the R4 definitions come with setup-peers")
def test_the_vendored_search_parameters_and_compartment_are_what_the_build_makes() -> None:
    built = vendor_r4.built(profile_build.DEFINITIONS)
    assert sorted(built) == ["compartment-patient.json", "search-parameters.json"]
    for name, text in built.items():
        assert (vendor_r4.DATA / name).read_text() == text, f"run python -m tools.vendor_r4 {profile_build.DEFINITIONS}"
