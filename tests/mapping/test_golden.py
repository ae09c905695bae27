"""Golden tests of the mappings: every IOP record under tests/data/<kind>/ (and every shared contract payload) must
map to exactly the FHIR resources of its <case>.fhir.json, and map back to itself.

Adding a case is adding files: <case>.json (the payload), optionally <case>.context.json (what the service would
know about the enrollment and gives the mapping as $context, e.g. {"age_group": "adolescent"} or {"gender": "female",
"care_team_plan": <a treatment plan id>}), then `IOP_FHIR_UPDATE_GOLDEN=1 .venv/bin/pytest
tests/mapping/test_golden.py` writes <case>.fhir.json, to be read by eye before it is committed. Records that name an
enrollment name the contract enrollment, stored under ENROLLMENT_ID; discharges close the contract treatment plan.
Group sessions name three enrollments: the contract enrollment stored under ENROLLMENT_ID, ENROLLMENT_ID_2 and _3.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import subprocess
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from conftest import EXAMPLES

from iop_fhir.iop import schemas
from iop_fhir.mapping import Produced, ids, load_engine
from iop_fhir.mapping.engine import Engine, merge
from iop_fhir.mapping.rules import Derived
from iop_fhir.r4.profiles import ProfileRegistry

# simple-icd-10-cm (imported by the enrollment rules on first use) reads its data with a deprecated importlib call;
# importing it here, warning silenced, keeps that third-party warning from failing every enrollment case.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import simple_icd_10_cm  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
CONTRACT = EXAMPLES.parent / "contract"
VALIDATOR = EXAMPLES.parent / "tools" / "fhir-validate"
ENROLLMENT_ID = "6f1c2d9e-0000-4000-8000-000000000001"
# The other enrollments a group session names ({{enrollment_id_2}}, {{enrollment_id_3}} in the contract).
OTHER_ENROLLMENT_IDS = {
    "{{enrollment_id_2}}": "6f1c2d9e-0000-4000-8000-000000000002",
    "{{enrollment_id_3}}": "6f1c2d9e-0000-4000-8000-000000000003",
}
UPDATE = os.environ.get("IOP_FHIR_UPDATE_GOLDEN") == "1"
# Dotted paths into each produced resource that change from run to run, removed before comparing and writing.
# Nothing the mapping produces changes today; a server-assigned element such as "meta.lastUpdated" would go here.
VOLATILE: list[str] = []

# The warnings preparing a case must give (diagnostics, in order); every case not named here must give none.
WARNINGS: dict[str, list[str]] = {
    "treatment-plan/adolescent-under-6-hours": [
        "scheduled treatment is 4.25 h/week, below the 6 h/week of ASAM level 2.1 for adolescent programs"
    ],
    "treatment-plan/adult-above-19-hours": [
        "scheduled treatment is 21 h/week, above the 19 h/week of ASAM level 2.1; consider level 2.5"
    ],
    "session/buprenorphine-expected": [
        "the positive buprenorphine result is expected: the patient is recorded as taking buprenorphine-naloxone "
        "(medication 7d0c8f0e-0000-4000-8000-00000000b001), so it is not a relapse signal"
    ],
}
# PHQ-9 item 9 above 0 (assessment.yaml, safety_item): a warning on the answer.
SAFETY = "a suicide-risk Flag is raised and an urgent Task asks the care team to review the screen"
WARNINGS["assessment/reassessment-suicide-risk"] = [f"PHQ-9 item 9 is 1: {SAFETY}"]
WARNINGS["assessment/phq9-item9-after-gad7"] = [f"PHQ-9 item 9 is 2: {SAFETY}"]
# (code, severity, expression) of the issues of cases whose issues are not intensity warnings of a plan.
WARNING_SHAPES: dict[str, tuple[str, str, str]] = {
    "assessment/reassessment-suicide-risk": ("business-rule", "warning", "instruments[0].items[8]"),
    "assessment/phq9-item9-after-gad7": ("business-rule", "warning", "instruments[1].items[8]"),
    "session/buprenorphine-expected": ("informational", "information", "drug_screen.results[0]"),
}
# Cases whose mapped output is wrong today: no golden file is written for them (not even in update mode) and their
# comparison is expected to fail. Once the mapping is fixed, delete the entry, regenerate, and read the new file.
UNBLESSED: dict[str, str] = {}
# Cases whose resources do not give the record back today (see the reason).
ROUND_TRIP_LOSES: dict[str, str] = {}


@dataclass(frozen=True)
class Case:
    kind: str
    name: str
    payload: dict[str, Any]
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.name}"

    @property
    def expected_path(self) -> Path:
        return DATA / self.kind / f"{self.name}.fhir.json"


def _contract(kind: str) -> dict[str, Any]:
    text = (CONTRACT / f"{kind}.json").read_text(encoding="utf-8")
    for placeholder, enrollment_id in OTHER_ENROLLMENT_IDS.items():
        text = text.replace(placeholder, enrollment_id)
    payload: dict[str, Any] = json.loads(text.replace("{{enrollment_id}}", ENROLLMENT_ID))
    return payload


def _cases() -> list[Case]:
    cases = []
    for kind in (*schemas.KINDS, *schemas.SINGLETONS):
        cases.append(Case(kind, "contract", _contract(kind)))
        for path in sorted((DATA / kind).glob("*.json")):
            if path.name.endswith((".fhir.json", ".context.json")):
                continue
            name = path.name.removesuffix(".json")
            context_path = path.with_name(f"{name}.context.json")
            context = json.loads(context_path.read_text(encoding="utf-8")) if context_path.exists() else {}
            cases.append(Case(kind, name, json.loads(path.read_text(encoding="utf-8")), context))
    return cases


CASES = _cases()


def _params(cases: list[Case], expected_to_fail: dict[str, str] | None = None) -> list[Any]:
    failing = expected_to_fail or {}
    params = []
    for case in cases:
        marks = [pytest.mark.xfail(reason=failing[case.id], strict=True)] if case.id in failing else []
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


@pytest.fixture(scope="module")
def engine() -> Engine:
    return load_engine(REPO / "mappings")


@dataclass
class Mapped:
    derived: Derived
    rid: str
    produced: list[Produced]


@cache
def _mapped(case_id: str) -> Mapped:
    case = next(c for c in CASES if c.id == case_id)
    engine = load_engine(REPO / "mappings")
    derived = engine.prepare(case.kind, case.payload, case.context)
    rid = engine.natural_key(case.kind, derived.record)
    return Mapped(derived, rid, engine.map(case.kind, derived.record, rid, case.context))


@cache
def _home_enrollment() -> list[Produced]:
    """The contract enrollment as stored under ENROLLMENT_ID: the patient and episode the other cases point at."""
    engine = load_engine(REPO / "mappings")
    record = engine.prepare("enrollment", _contract("enrollment"), {}).record
    return engine.map("enrollment", record, ENROLLMENT_ID)


@cache
def _other_enrollments() -> list[Produced]:
    """The contract enrollment stored also under each of OTHER_ENROLLMENT_IDS (the other attendees of a group)."""
    engine = load_engine(REPO / "mappings")
    record = engine.prepare("enrollment", _contract("enrollment"), {}).record
    return [p for rid in OTHER_ENROLLMENT_IDS.values() for p in engine.map("enrollment", record, rid)]


def _resolver(*groups: list[Produced]) -> Callable[[str], dict[str, Any] | None]:
    by_reference = {p.reference: p.resource for group in groups for p in group}
    return by_reference.get


def _without_volatile(resource: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(resource)
    for path in VOLATILE:
        *parents, last = path.split(".")
        node: Any = out
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def _dump(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def _diff(expected: Any, actual: Any, names: tuple[str, str] = ("expected", "actual")) -> str:
    lines = difflib.unified_diff(
        json.dumps(expected, indent=2, sort_keys=True).splitlines(),
        json.dumps(actual, indent=2, sort_keys=True).splitlines(),
        *names,
        lineterm="",
    )
    return "\n".join(lines)


# -- the output is the golden output -------------------------------------------------------------------------


@pytest.mark.parametrize("case", _params(CASES, UNBLESSED))
def test_record_maps_to_its_golden_resources(case: Case) -> None:
    mapped = _mapped(case.id)
    actual = [{"role": p.role, "resource": _without_volatile(p.resource)} for p in mapped.produced]
    if UPDATE and case.id not in UNBLESSED:
        case.expected_path.write_text(_dump(actual), encoding="utf-8")
    assert case.expected_path.exists(), f"{case.expected_path} is missing: run with IOP_FHIR_UPDATE_GOLDEN=1"
    expected = json.loads(case.expected_path.read_text(encoding="utf-8"))
    expected = [{"role": e["role"], "resource": _without_volatile(e["resource"])} for e in expected]
    assert actual == expected, "\n" + _diff(expected, actual, (str(case.expected_path.name), "mapped"))


def test_every_golden_file_has_its_case() -> None:
    known = {c.expected_path for c in CASES}
    assert sorted(set(DATA.glob("*/*.fhir.json")) - known) == []


@pytest.mark.parametrize("case", _params(CASES))
def test_case_is_a_valid_payload_of_its_kind(case: Case) -> None:
    assert schemas.load(case.kind, case.payload) == case.payload


# -- the resources map back to the record ---------------------------------------------------------------------


def _as_reversed(engine: Engine, kind: str, record: dict[str, Any]) -> dict[str, Any]:
    """The record the reverse mapping can give back: the prepared record without the kind's private fields and with
    the normalisations its mapping file lists."""
    out = copy.deepcopy(record)
    for name in engine.spec(kind).private:
        if "[]." in name:  # a field of each element of a list ("attendees[].progress_note")
            outer, inner = name.split("[].", 1)
            for item in out.get(outer, []):
                item.pop(inner, None)
        else:
            out.pop(name, None)
    if kind == "enrollment":
        # enrollment.yaml: "a support contact's family_sessions false is the same as leaving it out"
        for contact in out.get("support_contacts", []):
            if contact.get("family_sessions") is False:
                del contact["family_sessions"]
    return out


def _overlay_targets(engine: Engine, mapped: Mapped) -> list[tuple[str, dict[str, Any]]]:
    """The contract enrollment's and treatment plan's resources a discharge updates, with its changes merged in, under
    the roles the service stores them with ("<kind>:<role>"): a discharge's reason and goal outcomes live there."""
    overlays = engine.overlays("discharge", mapped.derived.record, mapped.rid)
    plan = _mapped("treatment-plan/contract")
    targets = [("enrollment", ENROLLMENT_ID, _home_enrollment()), ("treatment-plan", plan.rid, plan.produced)]
    out = []
    for kind, rid, produced in targets:
        mine = [o for o in overlays if o.record_kind == kind]
        for item in produced:
            if not any(o.role == item.role for o in mine):
                continue
            resource = item.resource
            for overlay in mine:
                if overlay.role != item.role:
                    continue
                if overlay.key is not None and resource["id"] != ids.resource_id(kind, rid, overlay.role, overlay.key):
                    continue
                resource = merge(resource, overlay.merge)
            out.append((f"{kind}:{item.role}", resource))
    return out


@pytest.mark.parametrize("case", _params(CASES, ROUND_TRIP_LOSES))
def test_resources_map_back_to_the_record(case: Case, engine: Engine) -> None:
    mapped = _mapped(case.id)
    expected = _as_reversed(engine, case.kind, mapped.derived.record)
    produced = [(p.role, p.resource) for p in mapped.produced]
    if case.kind == "discharge":
        produced += _overlay_targets(engine, mapped)
    resolve = _resolver(
        _home_enrollment(), _other_enrollments(), _mapped("treatment-plan/contract").produced, mapped.produced
    )
    back = engine.reverse(case.kind, produced, resolve)
    assert back == expected, "\n" + _diff(expected, back, ("record", "reversed"))


# -- warnings -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _params(CASES))
def test_preparing_gives_exactly_the_expected_warnings(case: Case) -> None:
    found = _mapped(case.id).derived.warnings
    assert [w.diagnostics for w in found] == WARNINGS.get(case.id, [])
    shape = WARNING_SHAPES.get(case.id, ("business-rule", "warning", "interventions"))
    for warning in found:
        assert (warning.code, warning.severity, warning.expression) == shape


def test_intensity_warnings_are_carried_by_the_care_plan() -> None:
    for case_id, diagnostics in WARNINGS.items():
        if not case_id.startswith("treatment-plan/"):
            continue
        careplan = next(p.resource for p in _mapped(case_id).produced if p.role == "careplan")
        carried = [
            e["valueString"]
            for e in careplan.get("extension", [])
            if e["url"] == "https://iop-fhir.org/fhir/StructureDefinition/intensity-warning"
        ]
        assert carried == diagnostics


# -- valid input at the edges of the tables -------------------------------------------------------------------


def test_dast10_total_of_zero_is_interpreted_in_the_lowest_band(engine: Engine) -> None:
    record = _contract("assessment")
    record["instruments"] = [{"instrument": "dast-10", "total_score": 0}]
    derived = engine.prepare("assessment", record, {})
    produced = engine.map("assessment", derived.record, engine.natural_key("assessment", derived.record))
    total = next(p.resource for p in produced if p.role == "total")
    assert total["valueQuantity"]["value"] == 0
    assert total["interpretation"][0]["coding"][0]["code"].startswith("severity-")


def test_inactive_partner_maps_to_an_inactive_organization(engine: Engine) -> None:
    record = {**_contract("partner"), "active": False}
    derived = engine.prepare("partner", record, {})
    (organization,) = engine.map("partner", derived.record, engine.natural_key("partner", derived.record))
    assert organization.resource["active"] is False


# -- the independent validator --------------------------------------------------------------------------------


def _every_resource(engine: Engine) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every resource of every case, and the episode and plan resources as each discharge changes them."""
    for case in CASES:
        mapped = _mapped(case.id)
        for produced in mapped.produced:
            yield f"{case.kind}--{case.name}--{produced.role}-{produced.resource['id']}.json", produced.resource
        if case.kind == "discharge":
            for role, resource in _overlay_targets(engine, mapped):
                yield f"{case.kind}--{case.name}--{role.replace(':', '-')}-{resource['id']}.json", resource


@pytest.mark.peers
def test_every_golden_resource_passes_the_independent_validator(tmp_path: Path, engine: Engine) -> None:
    written = 0
    for name, resource in _every_resource(engine):
        (tmp_path / name).write_text(json.dumps(resource), encoding="utf-8")
        written += 1
    result = subprocess.run([str(VALIDATOR), "--quiet", str(tmp_path)], capture_output=True, text=True, timeout=300)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert written > 0


@pytest.fixture(scope="module")
def profiles() -> ProfileRegistry:
    return ProfileRegistry.load(REPO / "profiles", REPO / "mappings" / "terminology")


@pytest.mark.parametrize("case", _params(CASES))
def test_every_resource_conforms_to_the_profile_it_claims(case: Case, profiles: ProfileRegistry) -> None:
    for produced in _mapped(case.id).produced:
        claimed = produced.resource["meta"]["profile"]
        assert all(profiles.known(url) for url in claimed), claimed
        errors = [i for i in profiles.claimed_issues(produced.resource) if i.severity == "error"]
        assert errors == [], (produced.role, errors)
