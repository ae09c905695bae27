"""The project's profiles: the generated StructureDefinitions (valid, up to date with profiles/src), the profile
checks of r4/profiles.py, and their use on writes and in $validate."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import EXAMPLES
from flask.testing import FlaskClient

from iop_fhir.errors import Issue
from iop_fhir.r4 import validation
from iop_fhir.r4.profiles import ProfileRegistry
from tools import profile_build

VALIDATOR = EXAMPLES.parent / "tools" / "fhir-validate"
PROFILES = profile_build.PROFILES
C = "https://iop-fhir.org/fhir/StructureDefinition/"
US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition/"
R4 = "http://hl7.org/fhir/StructureDefinition/"
# The US Core 6.1.0 profile (vendored in profiles/us-core/) each project profile derives from, by its spec.
ON_US_CORE = {spec["id"]: spec["base"] for spec in profile_build.load_specs() if spec.get("base")}
# Resource profiles of types US Core has no profile for (they stay on the R4 base).
NOT_ON_US_CORE = {"iop-episode-of-care", "iop-part2-consent", "iop-referral-task"}
NOT_ON_US_CORE |= {"iop-safety-flag", "iop-safety-task"}  # US Core has no Flag or Task profile
FHIR = "application/fhir+json"
PART2 = "https://www.ecfr.gov/current/title-42/chapter-I/subchapter-A/part-2"
NARRATIVE = {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">Plan</div>'}
SURVEY = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "survey"}]}
ASSESS_PLAN = {
    "coding": [{"system": "http://hl7.org/fhir/us/core/CodeSystem/careplan-category", "code": "assess-plan"}]
}
MENTAL_HEALTH_PLAN = {"coding": [{"system": "http://snomed.info/sct", "code": "718347000"}]}
CONCEPT = "https://iop-fhir.org/fhir/CodeSystem/iop-concepts"
PATIENT = {"reference": "Patient/p1"}
HOURS = {"value": 9, "unit": "h", "system": "http://unitsofmeasure.org", "code": "h"}

DESIGN_PROFILES = [
    "iop-partner-organization",
    "iop-patient",
    "iop-episode-of-care",
    "iop-sud-condition",
    "iop-support-contact",
    "iop-screening-observation",
    "iop-assessment-observation",
    "iop-treatment-plan",
    "iop-goal",
    "iop-care-team",
    "iop-session-encounter",
    "iop-craving-observation",
    "iop-drug-screen-observation",
    "iop-part2-consent",
    "iop-continuing-care-plan",
    "iop-aftercare-servicerequest",
    "iop-referral-task",
    "iop-practitioner",
    "iop-record-provenance",
]
DESIGN_EXTENSIONS = [
    "session-attendance",
    "weekly-treatment-hours",
    "intensity-warning",
    "discharge-reason",
    "referral-source",
]


def _concept(code: str) -> dict[str, Any]:
    return {"coding": [{"system": CONCEPT, "code": code}]}


def _observation(profile: str, **fields: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "meta": {"profile": [C + profile]},
        "status": "final",
        "category": [SURVEY],
        "code": _concept("craving-score"),
        "subject": PATIENT,
        "effectiveDateTime": "2026-03-02T10:00:00Z",
        **fields,
    }


def _careplan(profile: str, **fields: Any) -> dict[str, Any]:
    return {
        "resourceType": "CarePlan",
        "meta": {"profile": [C + profile]},
        "text": NARRATIVE,
        "status": "active",
        "intent": "plan",
        "category": [ASSESS_PLAN, MENTAL_HEALTH_PLAN],
        "subject": PATIENT,
        **fields,
    }


# One resource that satisfies each profile, using every required element.
EXAMPLES_BY_PROFILE: dict[str, dict[str, Any]] = {
    "iop-partner-organization": {
        "resourceType": "Organization",
        "identifier": [{"system": "https://iop-fhir.org/fhir/sid/partner", "value": "county-hospital"}],
        "active": True,
        "name": "County Hospital",
    },
    "iop-patient": {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5", "value": "MRN-1"}],
        "name": [{"family": "Rivera", "given": ["Alex"]}],
        "gender": "female",
        "telecom": [{"system": "phone", "value": "555-0100"}],
    },
    "iop-episode-of-care": {
        "resourceType": "EpisodeOfCare",
        "extension": [{"url": C + "referral-source", "valueCodeableConcept": _concept("referral-primary-care")}],
        "status": "active",
        "type": [{"coding": [{"system": "https://iop-fhir.org/fhir/CodeSystem/asam-level-of-care", "code": "2.1"}]}],
        "patient": PATIENT,
        "period": {"start": "2026-03-01"},
    },
    "iop-sud-condition": {
        "resourceType": "Condition",
        "clinicalStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]
        },
        "category": [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "problem-list-item"}
                ]
            }
        ],
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "F10.20"}]},
        "subject": PATIENT,
    },
    "iop-support-contact": {
        "resourceType": "RelatedPerson",
        "active": True,
        "patient": PATIENT,
        "relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "SPS"}]}],
        "name": [{"text": "Sam Rivera"}],
    },
    "iop-screening-observation": _observation(
        "iop-screening-observation",
        code={"coding": [{"system": "http://loinc.org", "code": "44261-6"}]},
        valueQuantity={"value": 12, "unit": "{score}", "system": "http://unitsofmeasure.org", "code": "{score}"},
    ),
    "iop-assessment-observation": _observation(
        "iop-assessment-observation", code=_concept("iop-assessment"), valueString="Recommend level 2.1"
    ),
    "iop-treatment-plan": _careplan(
        "iop-treatment-plan",
        extension=[{"url": C + "weekly-treatment-hours", "valueQuantity": HOURS}],
        activity=[{"detail": {"status": "scheduled", "code": _concept("group-therapy")}}],
    ),
    "iop-goal": {
        "resourceType": "Goal",
        "lifecycleStatus": "active",
        "description": {"text": "Three negative drug screens in a row"},
        "subject": PATIENT,
        "target": [{"dueDate": "2026-05-01"}],
    },
    "iop-care-team": {
        "resourceType": "CareTeam",
        "subject": PATIENT,
        "participant": [{"role": [_concept("primary-counselor")], "member": {"reference": "Practitioner/pr1"}}],
    },
    "iop-session-encounter": {
        "resourceType": "Encounter",
        "extension": [{"url": C + "session-attendance", "valueCoding": {"system": CONCEPT, "code": "attended"}}],
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "type": [_concept("group-therapy")],
        "serviceType": _concept("group-therapy"),
        "subject": PATIENT,
        "episodeOfCare": [{"reference": "EpisodeOfCare/e1"}],
        "period": {"start": "2026-03-02T10:00:00Z", "end": "2026-03-02T13:00:00Z"},
    },
    "iop-craving-observation": _observation(
        "iop-craving-observation", encounter={"reference": "Encounter/s1"}, valueInteger=4
    ),
    "iop-drug-screen-observation": _observation(
        "iop-drug-screen-observation",
        category=[
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}
        ],
        code={"coding": [{"system": "http://loinc.org", "code": "19295-5"}]},
        valueCodeableConcept={
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": "NEG"}]
        },
        specimen={"reference": "Specimen/sp1"},
    ),
    "iop-drug-screen-specimen": {
        "resourceType": "Specimen",
        "status": "available",
        "type": _concept("urine"),
        "subject": PATIENT,
        "collection": {"collectedDateTime": "2026-03-02T10:00:00Z"},
    },
    "iop-part2-consent": {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]
        },
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "42CFRPart2CD"}]},
            {"coding": [{"system": "http://loinc.org", "code": "64292-6"}]},
        ],
        "patient": PATIENT,
        "policy": [{"authority": "https://www.ecfr.gov", "uri": PART2}],
        "provision": {
            "type": "permit",
            "actor": [
                {
                    "role": {
                        "coding": [
                            {"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}
                        ]
                    },
                    "reference": {"reference": "Organization/county-hospital"},
                }
            ],
            "action": [
                {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "disclose"}]}
            ],
            "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}],
        },
    },
    "iop-continuing-care-plan": _careplan("iop-continuing-care-plan"),
    "iop-aftercare-servicerequest": {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "3457005"}]}],
        "code": _concept("outpatient-sud-counseling"),
        "subject": PATIENT,
        "performer": [{"reference": "Organization/county-hospital"}],
    },
    "iop-referral-task": {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]},
        "focus": {"reference": "ServiceRequest/sr1"},
        "for": PATIENT,
        "authoredOn": "2026-04-01",
        "requester": {"display": "Intensive outpatient program"},
        "owner": {"reference": "Organization/county-hospital"},
    },
    "iop-practitioner": {
        "resourceType": "Practitioner",
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}],
        "name": [{"text": "Dana Lee", "family": "Lee", "given": ["Dana"]}],
    },
    "iop-record-provenance": {
        "resourceType": "Provenance",
        "target": [{"reference": "CarePlan/cp1"}],
        "recorded": "2026-03-02T10:00:00Z",
        "agent": [{"who": {"display": "iop-fhir"}}],
        "entity": [{"role": "source", "what": {"display": "treatment-plan/tp1"}}],
    },
}
EXAMPLES_BY_PROFILE["iop-safety-flag"] = {
    "resourceType": "Flag",
    "extension": [
        {
            "url": "http://hl7.org/fhir/StructureDefinition/flag-detail",
            "valueReference": {"reference": "Observation/o9"},
        }
    ],
    "status": "active",
    "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/flag-category", "code": "safety"}]}],
    "code": _concept("suicide-risk-screen-positive"),
    "subject": PATIENT,
    "period": {"start": "2026-03-02T10:00:00Z"},
}
EXAMPLES_BY_PROFILE["iop-safety-task"] = {
    "resourceType": "Task",
    "status": "requested",
    "intent": "order",
    "priority": "asap",
    "code": _concept("review-suicide-risk-screen"),
    "focus": {"reference": "Flag/f1"},
    "for": PATIENT,
    "authoredOn": "2026-03-02T10:00:00Z",
}
EXAMPLES_BY_PROFILE["iop-program-organization"] = {
    "resourceType": "Organization",
    "extension": [{"url": C + "part2-program", "valueBoolean": True}],
    "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1780680033"}],
    "active": True,
    "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/organization-type", "code": "prov"}]}],
    "name": "Clifton Recovery Center IOP",
}
# The medication profiles' examples are what the mapping makes of the medication golden cases.
for _case, _profile in [
    ("contract", "iop-medication-request"),
    ("methadone-prescribed-elsewhere", "iop-medication-statement"),
    ("naloxone-kit-dispensed", "iop-medication-dispense"),
]:
    _mapped = json.loads((Path(__file__).parents[1] / "data" / "medication" / f"{_case}.fhir.json").read_text())
    [EXAMPLES_BY_PROFILE[_profile]] = [
        {k: v for k, v in item["resource"].items() if k not in ("id", "meta")}
        for item in _mapped
        if item["resource"]["resourceType"].startswith("Medication")
    ]
for _profile, _example in EXAMPLES_BY_PROFILE.items():
    _example.setdefault("meta", {"profile": [C + _profile]})


def example(profile: str) -> dict[str, Any]:
    return copy.deepcopy(EXAMPLES_BY_PROFILE[profile])


@pytest.fixture(scope="module")
def registry() -> ProfileRegistry:
    return ProfileRegistry.load(PROFILES)


def _errors(issues: list[Issue]) -> list[tuple[str, str | None]]:
    return [(i.code, i.expression) for i in issues if i.severity == "error"]


# -- the generated StructureDefinitions ----------------------------------------------------------------------


@pytest.mark.peers
def test_every_generated_structure_definition_passes_the_independent_validator() -> None:
    run = subprocess.run([str(VALIDATOR), "--json", str(PROFILES)], capture_output=True, timeout=300)
    verdicts = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    # the generated profiles, the US Core definitions they build on (as published and with their snapshots) and
    # the US Core terminology vendored with them
    built = sorted(str(p.relative_to(PROFILES)) for p in PROFILES.rglob("*.json"))
    assert sorted(str(Path(v["path"]).relative_to(PROFILES)) for v in verdicts) == built
    assert [(Path(v["path"]).name, v["issues"]) for v in verdicts if not v["ok"] or v["issues"]] == []
    assert run.returncode == 0


@pytest.mark.peers
@pytest.mark.skipif(not profile_build.DEFINITIONS.exists(), reason="the R4 definitions come with setup-peers")
def test_generated_structure_definitions_are_up_to_date_with_the_yaml() -> None:
    built = profile_build.build_all()
    on_disk = {p.name: p.read_text() for p in PROFILES.glob("StructureDefinition-*.json")}
    assert sorted(on_disk) == sorted(built), "run python -m tools.profile_build"
    stale = [name for name, text in built.items() if on_disk[name] != text]
    assert stale == [], "run python -m tools.profile_build"


@pytest.mark.skipif(not profile_build.US_CORE_RELEASE.exists(), reason="the US Core 6.1.0 release is ../shared")
def test_vendored_us_core_files_are_those_of_the_us_core_6_1_0_release_unchanged() -> None:
    release = profile_build.us_core_release_files()
    vendored = {
        str(p.relative_to(profile_build.US_CORE))
        for p in profile_build.US_CORE.rglob("*.json")
        if p.parent == profile_build.US_CORE_SOURCES or not p.name.startswith("StructureDefinition-")
    }
    assert vendored == set(release), "run python -m tools.profile_build --vendor-us-core"
    for name, source in release.items():
        assert (profile_build.US_CORE / name).read_text() == source.read_text(), name
    assert {f"StructureDefinition-{p}.json" for p in profile_build.US_CORE_PROFILES} <= {
        Path(name).name for name in release
    }


@pytest.mark.peers
@pytest.mark.skipif(not profile_build.DEFINITIONS.exists(), reason="the R4 definitions come with setup-peers")
def test_us_core_snapshots_are_up_to_date_with_the_vendored_differentials() -> None:
    built = profile_build.build_us_core()
    on_disk = {p.name: p.read_text() for p in profile_build.US_CORE.glob("StructureDefinition-*.json")}
    assert sorted(on_disk) == sorted(built), "run python -m tools.profile_build"
    stale = [name for name, text in built.items() if on_disk[name] != text]
    assert stale == [], "run python -m tools.profile_build"
    assert {json.loads(text)["version"] for text in on_disk.values()} == {"6.1.0"}


def test_a_us_core_snapshot_has_every_element_of_its_differential_with_its_constraints() -> None:
    for path in profile_build.US_CORE_SOURCES.glob("StructureDefinition-*.json"):
        published = json.loads(path.read_text())
        built = json.loads((profile_build.US_CORE / path.name).read_text())
        snapshot = {el["id"]: el for el in built["snapshot"]["element"]}
        for diff in published["differential"]["element"]:
            el = snapshot.get(diff["id"]) or snapshot[_choice_form(diff["id"], snapshot)]
            for key in ("min", "max", "mustSupport", "type", "sliceName", "slicing"):
                if key in diff:
                    assert el[key] == diff[key], (path.name, diff["id"], key)
            for key in ("fixedCode", "fixedUri", "patternCodeableConcept", "patternCoding", "patternIdentifier"):
                if key in diff:
                    assert el[key] == diff[key], (path.name, diff["id"], key)
            if "binding" in diff:
                assert el["binding"]["strength"] == diff["binding"]["strength"], (path.name, diff["id"])
            keys = {c["key"]: c["source"] for c in el.get("constraint", ())}
            for constraint in diff.get("constraint", ()):
                assert keys[constraint["key"]] == published["url"], (path.name, diff["id"])


def _choice_form(element_id: str, snapshot: dict[str, Any]) -> str:
    """``Observation.valueQuantity.code`` as ``Observation.value[x].code``: an element named by its one type."""
    parts = element_id.split(".")
    for i in range(1, len(parts)):
        if ".".join(parts[: i + 1]) not in snapshot:
            parent = ".".join(parts[:i])
            parts[i] = next(
                el_id[len(parent) + 1 :]
                for el_id in snapshot
                if el_id.startswith(parent + ".")
                and el_id.endswith("[x]")
                and parts[i].startswith(el_id[len(parent) + 1 : -3])
                and parts[i][len(el_id) - len(parent) - 4 :][:1].isupper()
            )
    return ".".join(parts)


def test_a_choice_element_named_by_its_type_is_narrowed_to_that_type() -> None:
    occupation = json.loads(
        (profile_build.US_CORE / "StructureDefinition-us-core-observation-occupation.json").read_text()
    )
    effective = next(el for el in occupation["snapshot"]["element"] if el["id"] == "Observation.effective[x]")
    assert [t["code"] for t in effective["type"]] == ["Period"]


def test_a_us_core_snapshot_builds_on_its_base_profile() -> None:
    lab = json.loads((profile_build.US_CORE / "StructureDefinition-us-core-observation-lab.json").read_text())
    assert lab["baseDefinition"] == US_CORE + "us-core-observation-clinical-result"
    ids = [el["id"] for el in lab["snapshot"]["element"]]
    assert "Observation.category:us-core" in ids
    sources = {c["key"]: c["source"] for el in lab["snapshot"]["element"] for c in el.get("constraint", ())}
    assert sources["us-core-2"] == US_CORE + "us-core-observation-clinical-result"


def test_every_structure_definition_passes_the_base_validation() -> None:
    for path in PROFILES.rglob("StructureDefinition-*.json"):
        issues = validation.validate(json.loads(path.read_text()), model_check=False)
        assert [i for i in issues if i.severity == "error"] == [], path.name


def test_every_profile_and_extension_of_the_design_is_generated(registry: ProfileRegistry) -> None:
    by_url = {sd["url"]: sd for sd in registry.profiles()}
    for name in DESIGN_PROFILES:
        assert by_url[C + name]["kind"] == "resource"
        assert by_url[C + name]["derivation"] == "constraint"
    for name in DESIGN_EXTENSIONS:
        assert by_url[C + name]["kind"] == "complex-type"
        assert by_url[C + name]["type"] == "Extension"
        assert by_url[C + name]["context"]


def test_structure_definitions_are_project_conformance_resources(registry: ProfileRegistry) -> None:
    for sd in registry.profiles():
        assert sd["url"] == C + sd["id"]
        assert (sd["status"], sd["version"], sd["publisher"], sd["fhirVersion"]) == (
            "active",
            "0.1.0",
            "iop-fhir",
            "4.0.1",
        )
        base = US_CORE + ON_US_CORE[sd["id"]] if sd["id"] in ON_US_CORE else R4 + sd["type"]
        assert sd["baseDefinition"] == base


def test_a_profile_of_a_type_us_core_profiles_derives_from_us_core(registry: ProfileRegistry) -> None:
    profiled = {
        json.loads(path.read_text())["type"]
        for path in profile_build.US_CORE.glob("StructureDefinition-*.json")
        if json.loads(path.read_text())["kind"] == "resource"
    }
    for sd in registry.profiles():
        if sd["kind"] == "resource" and sd["type"] in profiled:
            assert sd["baseDefinition"].startswith(US_CORE), sd["id"]
        if sd["id"] in NOT_ON_US_CORE:
            assert sd["type"] not in profiled and sd["baseDefinition"] == R4 + sd["type"], sd["id"]
    assert {"iop-patient", "iop-session-encounter", "iop-treatment-plan", "iop-drug-screen-observation"} <= set(
        ON_US_CORE
    )


def test_a_profile_on_us_core_keeps_every_us_core_constraint_in_its_snapshot(registry: ProfileRegistry) -> None:
    by_id = {sd["id"]: sd for sd in registry.profiles()}
    for profile, us_core_id in ON_US_CORE.items():
        us_core = json.loads((profile_build.US_CORE / f"StructureDefinition-{us_core_id}.json").read_text())
        ours = {el["id"]: el for el in by_id[profile]["snapshot"]["element"]}
        for base in us_core["snapshot"]["element"]:
            el = ours[base["id"]]
            assert el["min"] >= base["min"], el["id"]
            assert profile_build._max(el["max"]) <= profile_build._max(base["max"]), el["id"]
            assert el.get("mustSupport", False) >= base.get("mustSupport", False), el["id"]
            for key in ("binding", "sliceName"):
                assert el.get(key) == base.get(key), (el["id"], key)
            if "slicing" in base:  # a profile may slice what US Core does not, never slice otherwise
                assert el["slicing"] == base["slicing"], el["id"]
            # types are some of US Core's, a reference's targets the project's profiles of them at most
            assert {t["code"] for t in el.get("type", ())} <= {t["code"] for t in base.get("type", ())}, el["id"]
            assert {c["key"] for c in el.get("constraint", ())} >= {c["key"] for c in base.get("constraint", ())}


def test_a_profile_on_us_core_differs_from_it_only_where_it_is_stricter(registry: ProfileRegistry) -> None:
    patient = next(sd for sd in registry.profiles() if sd["id"] == "iop-patient")
    assert patient["differential"]["element"] == [
        {"id": "Patient.active", "path": "Patient.active", "mustSupport": True},
        {"id": "Patient.telecom", "path": "Patient.telecom", "mustSupport": True},
    ]


def test_every_invariant_of_a_snapshot_names_its_source(registry: ProfileRegistry) -> None:
    for sd in registry.profiles():
        for el in sd["snapshot"]["element"]:
            assert all(c.get("source") for c in el.get("constraint", ())), (sd["id"], el["id"])
    patient = next(sd for sd in registry.profiles() if sd["id"] == "iop-patient")
    sources = {c["key"]: c["source"] for el in patient["snapshot"]["element"] for c in el.get("constraint", ())}
    assert (sources["us-core-6"], sources["pat-1"]) == (US_CORE + "us-core-patient", R4 + "Patient")


def test_slices_follow_their_sliced_element_in_the_snapshot(registry: ProfileRegistry) -> None:
    plan = next(sd for sd in registry.profiles() if sd["id"] == "iop-treatment-plan")
    ids = [el["id"] for el in plan["snapshot"]["element"]]
    at = ids.index("CarePlan.category")
    assert ids[at : at + 4] == [
        "CarePlan.category",
        "CarePlan.category:AssessPlan",
        "CarePlan.category:mentalHealthCarePlan",
        "CarePlan.title",
    ]
    encounter = next(sd for sd in registry.profiles() if sd["id"] == "iop-session-encounter")
    ids = [el["id"] for el in encounter["snapshot"]["element"]]
    assert ids.index("Encounter.extension:sessionAttendance") == ids.index("Encounter.extension") + 1
    assert "Encounter.period.start" in ids  # Period unrolled to constrain its start


# -- the generator refuses specs that do not narrow their base ----------------------------------------------


@pytest.mark.peers
@pytest.mark.skipif(not profile_build.DEFINITIONS.exists(), reason="the R4 definitions come with setup-peers")
@pytest.mark.parametrize(
    ("elements", "message"),
    [
        ({"Goal.description": {"min": 0}}, "below the base min"),
        ({"Goal.subject": {"max": "*"}}, "above the base max"),
        ({"Goal.subject": {"targetProfile": ["Practitioner"]}}, "not a target of the base"),
        ({"Goal.lifecycleStatus": {"fixedString": "active"}}, "does not match the element's types"),
        ({"Goal.nothing": {"min": 1}}, "no element Goal.nothing"),
        ({"Goal.lifecycleStatus": {"minimum": 1}}, "unknown key 'minimum'"),
        ({"Goal.lifecycleStatus": {"min": 1}}, "min 1 restates the base"),
    ],
)
def test_generator_refuses_a_constraint_that_widens_or_misnames(elements: dict[str, Any], message: str) -> None:
    spec = {"id": "bad", "type": "Goal", "title": "Bad", "description": "Bad", "elements": elements}
    with pytest.raises(profile_build.SpecError, match=message):
        profile_build.build(spec, profile_build.Definitions(profile_build.DEFINITIONS), {})


@pytest.mark.peers
@pytest.mark.skipif(not profile_build.DEFINITIONS.exists(), reason="the R4 definitions come with setup-peers")
@pytest.mark.parametrize(
    ("elements", "message"),
    [
        ({"Patient.gender": {"min": 1}}, "min 1 restates the base"),
        ({"Patient.identifier.system": {"mustSupport": True}}, "mustSupport true restates the base"),
        ({"Patient.name": {"min": 0}}, "below the base min"),
        ({"Patient.extension:race": {"max": "*"}}, "above the base max"),
    ],
)
def test_generator_refuses_a_constraint_that_restates_or_widens_us_core(elements: dict[str, Any], message: str) -> None:
    spec = {
        "id": "bad",
        "type": "Patient",
        "base": "us-core-patient",
        "title": "B",
        "description": "B",
        "elements": elements,
    }
    with pytest.raises(profile_build.SpecError, match=message):
        profile_build.build(spec, profile_build.Definitions(profile_build.DEFINITIONS), {})


@pytest.mark.peers
@pytest.mark.skipif(not profile_build.DEFINITIONS.exists(), reason="the R4 definitions come with setup-peers")
def test_generator_refuses_a_base_of_another_type_or_not_vendored() -> None:
    definitions = profile_build.Definitions(profile_build.DEFINITIONS)
    spec = {"id": "bad", "type": "Goal", "base": "us-core-patient", "title": "B", "description": "B"}
    with pytest.raises(profile_build.SpecError, match="is a profile of Patient, not Goal"):
        profile_build.build(spec, definitions, {})
    with pytest.raises(profile_build.SpecError, match="no StructureDefinition .*us-core-goal-x in profiles/us-core"):
        profile_build.build({**spec, "base": "us-core-goal-x"}, definitions, {})


def test_generator_refuses_a_repeated_yaml_key(tmp_path: Path) -> None:
    (tmp_path / "twice.yaml").write_text("id: twice\ntype: Goal\nelements:\n  Goal.subject: {}\n  Goal.subject: {}\n")
    with pytest.raises(profile_build.SpecError, match="'Goal.subject' is given twice"):
        profile_build.load_specs(tmp_path)


# -- check(): each kind of constraint -----------------------------------------------------------------------


@pytest.mark.parametrize("profile", sorted(EXAMPLES_BY_PROFILE))
def test_a_resource_that_satisfies_its_profile_has_no_errors(registry: ProfileRegistry, profile: str) -> None:
    resource = example(profile)
    base = validation.validate(resource, model_check=False)
    assert [i for i in base if i.severity == "error"] == []
    assert _errors(registry.check(resource, C + profile)) == []


def test_every_resource_profile_has_an_example(registry: ProfileRegistry) -> None:
    resource_profiles = {sd["id"] for sd in registry.profiles() if sd["kind"] == "resource"}
    assert resource_profiles == set(EXAMPLES_BY_PROFILE)


def test_missing_required_element_is_reported(registry: ProfileRegistry) -> None:
    plan = example("iop-treatment-plan")
    del plan["activity"]
    assert _errors(registry.check(plan, C + "iop-treatment-plan")) == [("required", "CarePlan.activity")]


def test_missing_required_element_inside_a_repetition_names_the_repetition(registry: ProfileRegistry) -> None:
    team = example("iop-care-team")
    team["participant"].append({"role": [_concept("therapist")]})
    assert _errors(registry.check(team, C + "iop-care-team")) == [("required", "CareTeam.participant[1].member")]


def test_cardinality_is_checked_only_where_the_parent_exists(registry: ProfileRegistry) -> None:
    encounter = example("iop-session-encounter")
    encounter["period"] = {"start": "2026-03-02T10:00:00Z"}
    assert _errors(registry.check(encounter, C + "iop-session-encounter")) == [("required", "Encounter.period.end")]
    del encounter["period"]
    assert _errors(registry.check(encounter, C + "iop-session-encounter")) == [("required", "Encounter.period")]


def test_wrong_fixed_value_is_reported(registry: ProfileRegistry) -> None:
    plan = example("iop-treatment-plan")
    plan["intent"] = "order"
    issues = registry.check(plan, C + "iop-treatment-plan")
    assert _errors(issues) == [("value", "CarePlan.intent")]
    assert 'must be exactly "plan"' in issues[0].diagnostics


def test_pattern_mismatch_is_reported(registry: ProfileRegistry) -> None:
    consent = example("iop-part2-consent")
    consent["scope"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "adr"}]}
    assert _errors(registry.check(consent, C + "iop-part2-consent")) == [("value", "Consent.scope")]


def test_pattern_matches_a_value_with_more_than_the_pattern(registry: ProfileRegistry) -> None:
    consent = example("iop-part2-consent")
    consent["scope"]["coding"].insert(0, {"system": "http://example.org/local", "code": "x"})
    consent["scope"]["text"] = "Privacy consent"
    assert _errors(registry.check(consent, C + "iop-part2-consent")) == []


def test_code_outside_an_r4_required_binding_is_reported(registry: ProfileRegistry) -> None:
    goal = example("iop-goal")
    goal["lifecycleStatus"] = "done"
    issues = registry.check(goal, C + "iop-goal")
    assert _errors(issues) == [("code-invalid", "Goal.lifecycleStatus")]
    assert "http://hl7.org/fhir/ValueSet/goal-status" in issues[0].diagnostics


def test_missing_required_slice_is_reported(registry: ProfileRegistry) -> None:
    plan = example("iop-treatment-plan")
    plan["category"] = [ASSESS_PLAN]
    issues = registry.check(plan, C + "iop-treatment-plan")
    assert _errors(issues) == [("required", "CarePlan.category")]
    assert "slice 'mentalHealthCarePlan'" in issues[0].diagnostics


def test_slice_matched_by_a_child_value_is_found(registry: ProfileRegistry) -> None:
    consent = example("iop-part2-consent")
    consent["policy"] = [{"uri": "https://example.org/other-policy"}]
    assert _errors(registry.check(consent, C + "iop-part2-consent")) == [("required", "Consent.policy")]
    consent["policy"].append({"uri": PART2})
    assert _errors(registry.check(consent, C + "iop-part2-consent")) == []


def test_missing_required_extension_is_reported_by_its_url(registry: ProfileRegistry) -> None:
    encounter = example("iop-session-encounter")
    del encounter["extension"]
    assert _errors(registry.check(encounter, C + "iop-session-encounter")) == [
        ("required", f"Encounter.extension('{C}session-attendance')")
    ]


def test_extension_content_is_checked_against_its_definition(registry: ProfileRegistry) -> None:
    plan = example("iop-treatment-plan")
    plan["extension"][0]["valueQuantity"] = {**HOURS, "unit": "min", "code": "min"}
    assert _errors(registry.check(plan, C + "iop-treatment-plan")) == [
        ("value", f"CarePlan.extension('{C}weekly-treatment-hours').valueQuantity")
    ]


def test_too_many_repetitions_are_reported(registry: ProfileRegistry) -> None:
    team = example("iop-care-team")
    team["participant"][0]["role"].append(_concept("therapist"))
    issues = registry.check(team, C + "iop-care-team")
    assert _errors(issues) == [("structure", "CareTeam.participant[0].role")]
    assert "maximum allowed = 1, but found 2" in issues[0].diagnostics


def test_too_many_repetitions_of_a_slice_are_reported(registry: ProfileRegistry) -> None:
    observation = example("iop-screening-observation")
    observation["category"] = [SURVEY, copy.deepcopy(SURVEY)]
    issues = registry.check(observation, C + "iop-screening-observation")
    assert _errors(issues) == [("structure", "Observation.category")]
    assert "slice 'survey'" in issues[0].diagnostics


def test_too_many_extensions_of_one_url_are_reported(registry: ProfileRegistry) -> None:
    plan = example("iop-treatment-plan")
    plan["extension"].append({"url": C + "weekly-treatment-hours", "valueQuantity": HOURS})
    assert _errors(registry.check(plan, C + "iop-treatment-plan")) == [
        ("structure", f"CarePlan.extension('{C}weekly-treatment-hours')")
    ]


def test_choice_type_outside_the_profile_is_reported(registry: ProfileRegistry) -> None:
    screen = example("iop-drug-screen-observation")
    del screen["valueCodeableConcept"]
    screen["valueString"] = "negative"
    assert _errors(registry.check(screen, C + "iop-drug-screen-observation")) == [
        ("structure", "Observation.valueString"),
        ("required", "Observation.value"),
    ]


def test_value_outside_the_profile_bounds_is_reported(registry: ProfileRegistry) -> None:
    craving = example("iop-craving-observation")
    craving["valueInteger"] = 11
    issues = registry.check(craving, C + "iop-craving-observation")
    assert _errors(issues) == [("value", "Observation.valueInteger")]
    assert "at most 10" in issues[0].diagnostics


def test_reference_to_a_type_the_profile_does_not_allow_is_reported(registry: ProfileRegistry) -> None:
    consent = example("iop-part2-consent")
    consent["provision"]["actor"][0]["reference"] = {"reference": "Patient/p2"}
    assert _errors(registry.check(consent, C + "iop-part2-consent")) == [
        ("value", "Consent.provision.actor[0].reference.reference")
    ]


def test_profile_of_another_resource_type_is_reported(registry: ProfileRegistry) -> None:
    assert _errors(registry.check(example("iop-goal"), C + "iop-patient")) == [("invalid", "resourceType")]


def test_known_profiles_ignore_the_canonical_version(registry: ProfileRegistry) -> None:
    assert registry.known(C + "iop-goal|0.1.0")
    assert not registry.known(C + "iop-nothing")
    with pytest.raises(KeyError):
        registry.check(example("iop-goal"), C + "iop-nothing")


def test_claimed_issues_check_known_claimed_profiles_and_ignore_others(registry: ProfileRegistry) -> None:
    goal = example("iop-goal")
    goal["meta"]["profile"].append("http://hl7.org/fhir/us/core/StructureDefinition/us-core-goal")
    goal["lifecycleStatus"] = "done"
    assert _errors(registry.claimed_issues(goal)) == [("code-invalid", "Goal.lifecycleStatus")]
    del goal["meta"]
    assert registry.claimed_issues(goal) == []


def test_us_core_invariant_is_checked(registry: ProfileRegistry) -> None:
    patient = example("iop-patient")
    patient["name"] = [{"text": "Alex Rivera"}]
    issues = registry.check(patient, C + "iop-patient")
    assert _errors(issues) == [("invariant", "Patient.name[0]")]
    assert "(us-core-6)" in issues[0].diagnostics


def test_us_core_invariant_holds_with_a_data_absent_reason(registry: ProfileRegistry) -> None:
    patient = example("iop-patient")
    patient["name"] = [
        {
            "text": "Alex Rivera",
            "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "masked"}],
        }
    ]
    assert _errors(registry.check(patient, C + "iop-patient")) == []


def test_us_core_cardinality_is_checked(registry: ProfileRegistry) -> None:
    patient = example("iop-patient")
    del patient["identifier"][0]["system"], patient["gender"]
    assert _errors(registry.check(patient, C + "iop-patient")) == [
        ("required", "Patient.identifier[0].system"),
        ("required", "Patient.gender"),
    ]


def test_us_core_extension_is_checked_against_its_vendored_definition(registry: ProfileRegistry) -> None:
    race = US_CORE + "us-core-race"
    omb = {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2106-3", "display": "White"}
    patient = example("iop-patient")
    patient["extension"] = [{"url": race, "extension": [{"url": "ombCategory", "valueCoding": omb}]}]
    issues = [i for i in registry.check(patient, C + "iop-patient") if i.severity == "error"]
    assert _errors(issues) == [("required", f"Patient.extension('{race}').extension")]
    assert "slice 'text'" in issues[0].diagnostics
    patient["extension"][0]["extension"].append({"url": "text", "valueString": "White"})
    assert _errors(registry.check(patient, C + "iop-patient")) == []


def test_extensible_us_core_binding_is_no_error(registry: ProfileRegistry) -> None:
    patient = example("iop-patient")
    patient["address"] = [{"state": "Ontario"}]
    patient["communication"] = [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "x-local"}]}}]
    assert _errors(registry.check(patient, C + "iop-patient")) == []


def test_us_core_definitions_are_bases_not_profiles_of_the_project(registry: ProfileRegistry) -> None:
    assert registry.known(US_CORE + "us-core-patient")  # for $validate with a profile
    assert not registry.known(US_CORE + "us-core-race")  # an extension definition is no profile to check against
    assert all(sd["url"].startswith(C) for sd in registry.profiles())


def test_a_claimed_us_core_profile_is_not_enforced_but_an_explicit_check_is(registry: ProfileRegistry) -> None:
    goal = example("iop-goal")
    goal["meta"] = {"profile": [US_CORE + "us-core-goal"]}
    del goal["description"]
    assert registry.claimed_issues(goal) == []
    assert _errors(registry.check(goal, US_CORE + "us-core-goal")) == [("required", "Goal.description")]


def test_a_slice_by_value_set_matches_the_codes_of_its_value_set(registry: ProfileRegistry) -> None:
    condition = example("iop-sud-condition")
    us_core = US_CORE + "us-core-condition-problems-health-concerns"
    assert _errors(registry.check(condition, us_core)) == []
    condition["category"] = [{"coding": [{"system": "http://example.org/local", "code": "problem"}]}]
    issues = registry.check(condition, us_core)
    assert ("required", "Condition.category") in _errors(issues)
    assert any("slice 'us-core' (with a code of" in i.diagnostics for i in issues)


# -- bindings to project value sets (a spec built here, a terminology folder of the test's own) ----------------


@pytest.fixture(scope="module")
def bound_registry(tmp_path_factory: pytest.TempPathFactory) -> ProfileRegistry:
    if not profile_build.DEFINITIONS.exists():
        pytest.skip("the R4 definitions come with setup-peers")
    terminology = tmp_path_factory.mktemp("terminology")
    system = "https://iop-fhir.org/fhir/CodeSystem/iop-test-outcome"
    (terminology / "CodeSystem-iop-test-outcome.json").write_text(
        json.dumps(
            {
                "resourceType": "CodeSystem",
                "url": system,
                "status": "active",
                "content": "complete",
                "concept": [{"code": "improving"}, {"code": "worsening", "concept": [{"code": "relapsed"}]}],
            }
        )
    )
    (terminology / "ValueSet-iop-test-outcome.json").write_text(
        json.dumps(
            {
                "resourceType": "ValueSet",
                "url": "https://iop-fhir.org/fhir/ValueSet/iop-test-outcome",
                "status": "active",
                "compose": {"include": [{"system": system}]},
            }
        )
    )
    spec = {
        "id": "test-goal",
        "type": "Goal",
        "title": "Test goal",
        "description": "A goal with bound codes",
        "elements": {
            "Goal.achievementStatus": {"binding": {"strength": "required", "valueSet": "iop-test-outcome"}},
            "Goal.priority": {"binding": {"strength": "extensible", "valueSet": "iop-test-outcome"}},
            "Goal.category": {"binding": {"strength": "required", "valueSet": "iop-missing"}},
            "Goal.target": {
                "constraint": [
                    {
                        "key": "test-1",
                        "severity": "error",
                        "human": "A target has a due date",
                        "expression": "due.exists()",
                    }
                ]
            },
        },
    }
    sd = profile_build.build(spec, profile_build.Definitions(profile_build.DEFINITIONS), {})
    profiles = tmp_path_factory.mktemp("profiles")
    (profiles / "StructureDefinition-test-goal.json").write_text(profile_build.render(sd))
    return ProfileRegistry.load(profiles, terminology)


def _bound_goal(achievement: str, priority: str = "improving") -> dict[str, Any]:
    system = "https://iop-fhir.org/fhir/CodeSystem/iop-test-outcome"
    return {
        **example("iop-goal"),
        "achievementStatus": {"coding": [{"system": system, "code": achievement}]},
        "priority": {"coding": [{"system": system, "code": priority}]},
    }


@pytest.mark.peers
def test_code_outside_a_required_project_binding_is_an_error(bound_registry: ProfileRegistry) -> None:
    issues = bound_registry.check(_bound_goal("stalled"), C + "test-goal")
    assert _errors(issues) == [("code-invalid", "Goal.achievementStatus")]
    assert "https://iop-fhir.org/fhir/ValueSet/iop-test-outcome" in issues[0].diagnostics


@pytest.mark.peers
def test_codes_of_a_whole_code_system_include_nested_concepts(bound_registry: ProfileRegistry) -> None:
    assert _errors(bound_registry.check(_bound_goal("relapsed"), C + "test-goal")) == []


@pytest.mark.peers
def test_code_outside_an_extensible_binding_is_a_warning(bound_registry: ProfileRegistry) -> None:
    issues = bound_registry.check(_bound_goal("improving", priority="stalled"), C + "test-goal")
    assert [(i.severity, i.code, i.expression) for i in issues] == [("warning", "code-invalid", "Goal.priority")]


@pytest.mark.peers
def test_a_binding_to_an_unknown_value_set_is_a_warning(bound_registry: ProfileRegistry) -> None:
    goal = {**_bound_goal("improving"), "category": [_concept("behavioral")]}
    issues = bound_registry.check(goal, C + "test-goal")
    assert [(i.severity, i.code, i.expression) for i in issues] == [("warning", "not-supported", "Goal.category[0]")]


@pytest.mark.peers
def test_an_invariant_the_profile_adds_is_checked_on_each_repetition(bound_registry: ProfileRegistry) -> None:
    goal = _bound_goal("improving")
    goal["target"].append({"detailString": "No missed sessions"})
    issues = bound_registry.check(goal, C + "test-goal")
    assert _errors(issues) == [("invariant", "Goal.target[1]")]
    assert "A target has a due date (test-1)" in issues[0].diagnostics


# -- writes and $validate through the API -------------------------------------------------------------------


def _post(client: FlaskClient, path: str, body: Any) -> Any:
    return client.post(f"/fhir/{path}", data=orjson.dumps(body), headers={"Content-Type": FHIR})


def _issues(response: Any) -> list[tuple[str, str]]:
    return [(i["code"], i.get("expression", [""])[0]) for i in response.get_json()["issue"] if i["severity"] == "error"]


def test_create_claiming_a_profile_it_breaks_is_refused_with_the_expression(client: FlaskClient) -> None:
    plan = example("iop-treatment-plan")
    del plan["category"]
    response = _post(client, "CarePlan", plan)
    assert response.status_code == 400
    assert ("required", "CarePlan.category") in _issues(response)
    assert client.get("/fhir/CarePlan").get_json()["total"] == 0


def test_create_claiming_a_profile_it_satisfies_is_stored(client: FlaskClient) -> None:
    response = _post(client, "CarePlan", example("iop-treatment-plan"))
    assert response.status_code == 201


def test_create_without_the_profile_claim_is_not_checked_against_it(client: FlaskClient) -> None:
    plan = example("iop-treatment-plan")
    del plan["category"], plan["meta"]
    assert _post(client, "CarePlan", plan).status_code == 201


def test_update_and_patch_are_checked_against_the_claimed_profile(client: FlaskClient) -> None:
    created = _post(client, "CarePlan", example("iop-treatment-plan")).get_json()
    changed = {**created, "intent": "proposal"}
    response = client.put(f"/fhir/CarePlan/{created['id']}", data=orjson.dumps(changed), headers={"Content-Type": FHIR})
    assert response.status_code == 400
    assert _issues(response) == [("value", "CarePlan.intent")]
    patch = [{"op": "remove", "path": "/activity"}]
    response = client.patch(
        f"/fhir/CarePlan/{created['id']}",
        data=orjson.dumps(patch),
        headers={"Content-Type": "application/json-patch+json"},
    )
    assert response.status_code == 400
    assert _issues(response) == [("required", "CarePlan.activity")]
    assert client.get(f"/fhir/CarePlan/{created['id']}").get_json()["meta"]["versionId"] == "1"


def test_transaction_entry_breaking_its_profile_fails_the_transaction(client: FlaskClient) -> None:
    plan = example("iop-treatment-plan")
    plan["intent"] = "order"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": example("iop-patient"), "request": {"method": "POST", "url": "Patient"}},
            {"resource": plan, "request": {"method": "POST", "url": "CarePlan"}},
        ],
    }
    response = _post(client, "", bundle)
    assert response.status_code == 400
    assert _issues(response) == [("value", "Bundle.entry[1].resource.intent")]
    assert client.get("/fhir/Patient").get_json()["total"] == 0


def test_validate_with_a_profile_parameter_reports_its_issues(client: FlaskClient) -> None:
    plan = example("iop-treatment-plan")
    del plan["meta"], plan["activity"]
    assert _issues(_post(client, "CarePlan/$validate", plan)) == []
    response = _post(client, f"CarePlan/$validate?profile={C}iop-treatment-plan", plan)
    assert response.status_code == 200
    assert _issues(response) == [("required", "CarePlan.activity")]


def test_validate_takes_the_profile_from_parameters(client: FlaskClient) -> None:
    plan = example("iop-treatment-plan")
    del plan["meta"]
    plan["intent"] = "order"
    parameters = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "resource", "resource": plan},
            {"name": "profile", "valueUri": C + "iop-treatment-plan"},
        ],
    }
    response = _post(client, "CarePlan/$validate", parameters)
    assert response.status_code == 200
    assert _issues(response) == [("value", "CarePlan.intent")]


def test_validate_checks_the_profiles_the_resource_claims(client: FlaskClient) -> None:
    plan = example("iop-treatment-plan")
    plan["intent"] = "order"
    assert _issues(_post(client, "CarePlan/$validate", plan)) == [("value", "CarePlan.intent")]


def test_validate_of_a_satisfied_profile_finds_no_issues(client: FlaskClient) -> None:
    response = _post(client, f"CarePlan/$validate?profile={C}iop-treatment-plan", example("iop-treatment-plan"))
    assert response.get_json()["issue"][0]["severity"] == "information"


def test_validate_with_an_unknown_profile_is_refused_naming_it(client: FlaskClient) -> None:
    response = _post(client, f"CarePlan/$validate?profile={C}iop-nothing", example("iop-treatment-plan"))
    assert response.status_code == 400
    issue = response.get_json()["issue"][0]
    assert (issue["code"], issue["expression"]) == ("not-supported", ["profile"])
    assert f"{C}iop-nothing" in issue["diagnostics"]
