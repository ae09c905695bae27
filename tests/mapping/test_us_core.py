"""US Core 6.1.0 in the mappings: each resource claims its project profile and the US Core profile that profile
derives from; every golden output conforms to both; practitioner names are split as US Core Practitioner needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from iop_fhir.mapping import functions, spec
from iop_fhir.mapping.engine import merge
from iop_fhir.r4.profiles import ProfileRegistry

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
PROJECT = "https://iop-fhir.org/fhir/StructureDefinition/"
US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition/"


@pytest.fixture(scope="module")
def registry() -> ProfileRegistry:
    return ProfileRegistry.load(REPO / "profiles", REPO / "mappings" / "terminology")


def _bases() -> dict[str, str]:
    """Project profile id -> the URL of the profile it derives from."""
    out = {}
    for path in (REPO / "profiles").glob("StructureDefinition-*.json"):
        sd = json.loads(path.read_text())
        out[sd["id"]] = sd["baseDefinition"]
    return out


def _golden() -> list[tuple[str, dict[str, Any]]]:
    """(case, resource) of every golden output."""
    out = []
    for path in sorted(DATA.glob("*/*.fhir.json")):
        for item in json.loads(path.read_text()):
            out.append((f"{path.parent.name}/{path.name.removesuffix('.fhir.json')}", item["resource"]))
    return out


GOLDEN = _golden()


def test_a_resource_claims_the_us_core_profile_its_project_profile_derives_from() -> None:
    bases = _bases()
    for mapping in spec.load_all(REPO / "mappings").values():
        for resource in mapping.resources:
            base = bases[resource.profile]
            expected = base.removeprefix(US_CORE) if base.startswith(US_CORE) else None
            assert resource.us_core == expected, (mapping.kind, resource.role, resource.profile)


def test_every_golden_resource_claims_its_project_profile_then_its_us_core_one() -> None:
    bases = _bases()
    for case, resource in GOLDEN:
        claimed = resource["meta"]["profile"]
        profile_id = claimed[0].removeprefix(PROJECT)
        base = bases[profile_id]
        assert claimed == ([claimed[0], base] if base.startswith(US_CORE) else [claimed[0]]), (case, resource["id"])


@pytest.mark.parametrize(("case", "resource"), GOLDEN, ids=[f"{c}:{r['resourceType']}/{r['id']}" for c, r in GOLDEN])
def test_every_golden_resource_conforms_to_the_us_core_profile_it_claims(
    registry: ProfileRegistry, case: str, resource: dict[str, Any]
) -> None:
    for url in resource["meta"]["profile"][1:]:
        errors = [(i.code, i.expression, i.diagnostics) for i in registry.check(resource, url) if i.severity == "error"]
        assert errors == [], case


@pytest.mark.parametrize(
    ("written", "name"),
    [
        ("Dana Whitfield, LCADC", {"family": "Whitfield", "given": ["Dana"], "suffix": ["LCADC"]}),
        ("Priya Natarajan, MD", {"family": "Natarajan", "given": ["Priya"], "suffix": ["MD"]}),
        ("Test Peer Specialist, CPRS", {"family": "Specialist", "given": ["Test", "Peer"], "suffix": ["CPRS"]}),
        ("Ana Lucia Ortiz, LCSW, LCADC", {"family": "Ortiz", "given": ["Ana", "Lucia"], "suffix": ["LCSW", "LCADC"]}),
        ("Sam Lee", {"family": "Lee", "given": ["Sam"]}),
        ("Okafor", {"family": "Okafor"}),
        ("  Jo   Park ,  RN ", {"family": "Park", "given": ["Jo"], "suffix": ["RN"]}),
    ],
)
def test_a_practitioner_name_splits_into_given_family_and_credential_suffixes(
    written: str, name: dict[str, Any]
) -> None:
    assert functions.human_name(written) == {"text": written.strip(), **name}
    assert functions.human_name_text(functions.human_name(written) or {}) == written.strip()


@pytest.mark.parametrize("written", [None, "", "   "])
def test_no_name_gives_no_human_name(written: str | None) -> None:
    assert functions.human_name(written) is None


def test_every_golden_practitioner_has_a_family_name_and_keeps_the_name_as_written() -> None:
    practitioners = [r for _, r in GOLDEN if r["resourceType"] == "Practitioner"]
    assert practitioners
    for practitioner in practitioners:
        name = practitioner["name"][0]
        assert name["family"] and name["text"].split(",")[0].split()[-1] == name["family"]


def test_a_discharge_replaces_a_clinical_status_rather_than_adding_a_coding_to_it() -> None:
    clinical = "http://terminology.hl7.org/CodeSystem/condition-clinical"
    condition = {
        "resourceType": "Condition",
        "clinicalStatus": {"coding": [{"system": clinical, "code": "active"}]},
        "code": {"text": "Alcohol dependence"},
    }
    merged = merge(condition, {"clinicalStatus": {"coding": [{"system": clinical, "code": "remission"}]}})
    assert merged["clinicalStatus"] == {"coding": [{"system": clinical, "code": "remission"}]}
    assert merge(condition, {"code": {"id": "c1"}})["code"] == {"text": "Alcohol dependence", "id": "c1"}
