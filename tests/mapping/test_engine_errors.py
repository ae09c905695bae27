"""Bad input to the mapping engine: each refusal is an Invalid whose first issue has the OperationOutcome code, the
JSON path of the offending field as expression, and diagnostics that say what is allowed. No app: the engine alone."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
from conftest import EXAMPLES

from iop_fhir.errors import Invalid, Issue
from iop_fhir.mapping import load_engine
from iop_fhir.mapping.engine import Engine
from iop_fhir.mapping.terminology import Terminology

# simple-icd-10-cm (imported by the enrollment rules on first use) reads its data with a deprecated importlib call;
# importing it here, warning silenced, keeps that third-party warning from failing the ICD-10-CM tests.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import simple_icd_10_cm  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
ENROLLMENT_ID = "6f1c2d9e-0000-4000-8000-000000000001"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return load_engine(REPO / "mappings")


def _contract(kind: str) -> dict[str, Any]:
    text = (EXAMPLES.parent / "contract" / f"{kind}.json").read_text(encoding="utf-8")
    payload: dict[str, Any] = json.loads(text.replace("{{enrollment_id}}", ENROLLMENT_ID))
    return payload


def _refusal(engine: Engine, kind: str, record: dict[str, Any]) -> list[Issue]:
    """The issues of preparing and mapping the record, which must be refused."""
    with pytest.raises(Invalid) as raised:
        derived = engine.prepare(kind, record, {})
        engine.map(kind, derived.record, engine.natural_key(kind, derived.record))
    return raised.value.issues


def _assessment(*instruments: dict[str, Any]) -> dict[str, Any]:
    record = _contract("assessment")
    record["instruments"] = list(instruments)
    return record


def test_unknown_service_code_is_rejected_with_the_allowed_values(engine: Engine) -> None:
    session = _contract("session")
    session["service"] = "yoga-class"
    issue = _refusal(engine, "session", session)[0]
    assert (issue.code, issue.expression) == ("code-invalid", "service")
    assert "unknown value 'yoga-class'" in issue.diagnostics
    assert "allowed: group-therapy, individual-counseling," in issue.diagnostics
    assert ", yoga," in issue.diagnostics


def test_analyte_that_no_map_covers_for_its_specimen_is_rejected_naming_each_result(
    engine: Engine, tmp_path: Path
) -> None:
    # Every specimen x analyte of the vocabulary maps (tests/mapping/test_drug_screens.py); a terminology whose
    # analyte map lacks the project codes shows the refusal a gap would give.
    terminology = tmp_path / "terminology"
    shutil.copytree(REPO / "mappings" / "terminology", terminology)
    path = terminology / "ConceptMap-iop-analyte.json"
    conceptmap = json.loads(path.read_text(encoding="utf-8"))
    conceptmap["group"] = [g for g in conceptmap["group"] if not g["target"].endswith("/drug-screen-test")]
    path.write_text(json.dumps(conceptmap), encoding="utf-8")
    gapped = Engine(engine.specs, Terminology.load(terminology))
    session = _contract("session")
    session["drug_screen"]["specimen"] = "oral-fluid"
    issues = _refusal(gapped, "session", session)
    assert (issues[0].code, issues[0].expression) == ("code-invalid", "drug_screen.results[0].analyte")
    assert "no map covers code 'ethyl-glucuronide' with specimen 'oral-fluid'" in issues[0].diagnostics
    # every uncovered analyte is named, not only the first
    assert [i.expression for i in issues] == [f"drug_screen.results[{n}].analyte" for n in range(3)]


def test_phq9_items_that_do_not_add_up_to_the_total_are_rejected(engine: Engine) -> None:
    record = _assessment({"instrument": "phq-9", "items": [2, 2, 1, 2, 1, 2, 1, 1, 0], "total_score": 13})
    issue = _refusal(engine, "assessment", record)[0]
    assert (issue.code, issue.expression) == ("invariant", "instruments[0].total_score")
    assert "add up to 12, but total_score is 13" in issue.diagnostics


def test_phq9_with_eight_item_scores_is_rejected(engine: Engine) -> None:
    record = _assessment({"instrument": "phq-9", "items": [2, 2, 1, 2, 1, 2, 1, 1]})
    issue = _refusal(engine, "assessment", record)[0]
    assert (issue.code, issue.expression) == ("value", "instruments[0].items")
    assert "phq-9 has 9 items, got 8" in issue.diagnostics


def test_gad7_total_above_21_is_rejected_as_out_of_range(engine: Engine) -> None:
    issue = _refusal(engine, "assessment", _assessment({"instrument": "gad-7", "total_score": 22}))[0]
    assert (issue.code, issue.expression) == ("value", "instruments[0].total_score")
    assert "between 0 and 21, got 22" in issue.diagnostics


def test_audit_c_items_that_do_not_add_up_to_the_total_are_rejected(engine: Engine) -> None:
    record = _assessment({"instrument": "audit-c", "items": [3, 3, 2], "total_score": 9})
    issue = _refusal(engine, "assessment", record)[0]
    assert (issue.code, issue.expression) == ("invariant", "instruments[0].total_score")
    assert "add up to 8, but total_score is 9" in issue.diagnostics


def test_audit_c_item_above_4_is_rejected_naming_the_item(engine: Engine) -> None:
    issue = _refusal(engine, "assessment", _assessment({"instrument": "audit-c", "items": [1, 5, 0]}))[0]
    assert (issue.code, issue.expression) == ("value", "instruments[0].items[1]")
    assert "between 0 and 4, got 5" in issue.diagnostics


def test_audit_c_with_four_item_scores_is_rejected(engine: Engine) -> None:
    issue = _refusal(engine, "assessment", _assessment({"instrument": "audit-c", "items": [1, 1, 1, 1]}))[0]
    assert (issue.code, issue.expression) == ("value", "instruments[0].items")
    assert "audit-c has 3 items, got 4" in issue.diagnostics


def test_unknown_instrument_is_rejected_with_the_known_ones(engine: Engine) -> None:
    issue = _refusal(engine, "assessment", _assessment({"instrument": "cage", "total_score": 2}))[0]
    assert (issue.code, issue.expression) == ("code-invalid", "instruments[0].instrument")
    assert "unknown instrument 'cage'; allowed: phq-9, gad-7, audit-c, dast-10" in issue.diagnostics


def test_icd10cm_category_is_rejected_as_not_billable(engine: Engine) -> None:
    enrollment = _contract("enrollment")
    enrollment["diagnoses"][0]["code"] = "F10.2"
    issue = _refusal(engine, "enrollment", enrollment)[0]
    assert (issue.code, issue.expression) == ("code-invalid", "diagnoses[0].code")
    assert "'F10.2' is an ICD-10-CM category, not a billable code" in issue.diagnostics
    assert "F10.20" in issue.diagnostics


def test_intervention_naming_an_unknown_goal_key_is_rejected(engine: Engine) -> None:
    plan = _contract("treatment-plan")
    plan["interventions"][2]["goals"] = ["abstinence", "sobriety"]
    issue = _refusal(engine, "treatment-plan", plan)[0]
    assert (issue.code, issue.expression) == ("invariant", "interventions[2].goals[1]")
    assert "unknown goal key 'sobriety'; the plan's goals are: abstinence, triggers, attendance, mood" in (
        issue.diagnostics
    )
