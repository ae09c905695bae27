"""Record rules that need the mapping's tables: instrument scoring and ASAM intensity. Adding an instrument or
changing a threshold is an edit to the tables in mappings/, not here."""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from iop_fhir.errors import Issue
from iop_fhir.mapping import functions

DAYS = {"d": 1.0, "wk": 7.0, "mo": 365.25 / 12, "a": 365.25}


@dataclass
class Derived:
    record: dict[str, Any]
    warnings: list[Issue] = field(default_factory=list)
    errors: list[Issue] = field(default_factory=list)


def instrument_scores(record: dict[str, Any], tables: Mapping[str, Any], context: Mapping[str, Any]) -> Derived:
    """Each instrument: known, item count and item range right, total in range and equal to the items' sum; a
    missing total is computed from the items. An answer above 0 to an instrument's safety item (PHQ-9 item 9) is a
    warning."""
    out = Derived(record)
    instruments = tables["instruments"]
    seen: dict[str, int] = {}
    for n, entry in enumerate(record.get("instruments") or []):
        where = f"instruments[{n}]"
        name = entry.get("instrument")
        definition = instruments.get(name)
        if definition is None:
            allowed = ", ".join(instruments)
            out.errors.append(
                Issue("code-invalid", f"unknown instrument '{name}'; allowed: {allowed}", where + ".instrument")
            )
            continue
        if name in seen:
            out.errors.append(
                Issue("invariant", f"instrument '{name}' is already given at instruments[{seen[name]}]", where)
            )
        seen[name] = n
        low, high = definition["range"]
        items = entry.get("items")
        total = entry.get("total_score")
        if items is not None:
            expected = len(definition.get("items") or [])
            if not expected:
                out.errors.append(
                    Issue("value", f"{name} is recorded by its total only; items are not accepted", where + ".items")
                )
                continue
            if len(items) != expected:
                out.errors.append(
                    Issue("value", f"{name} has {expected} items, got {len(items)} item scores", where + ".items")
                )
                continue
            item_low, item_high = definition["item_range"]
            bad = False
            for i, score in enumerate(items):
                if not item_low <= score <= item_high:
                    bad = True
                    out.errors.append(
                        Issue(
                            "value", f"must be between {item_low} and {item_high}, got {score}", f"{where}.items[{i}]"
                        )
                    )
            if bad:
                continue
            computed = sum(items)
            if total is None:
                entry["total_score"] = total = computed
            elif total != computed:
                out.errors.append(
                    Issue(
                        "invariant",
                        f"the item scores add up to {computed}, but total_score is {total}",
                        where + ".total_score",
                    )
                )
                continue
            # TERMINOLOGY.md §3.1: an answer above 0 to PHQ-9 item 9 starts a safety workflow (assessment.yaml).
            number = definition.get("safety_item")
            if number and items[number - 1] > 0:
                out.warnings.append(
                    Issue(
                        "business-rule",
                        f"{name.upper()} item {number} is {items[number - 1]}: {definition['safety_warning']}",
                        f"{where}.items[{number - 1}]",
                        severity="warning",
                    )
                )
        if total is None:
            out.errors.append(
                Issue("required", "total_score is required when items are not given", where + ".total_score")
            )
        elif not low <= total <= high:
            out.errors.append(
                Issue("value", f"{name} total must be between {low} and {high}, got {total}", where + ".total_score")
            )
    return out


def weekly_hours(record: dict[str, Any], tables: Mapping[str, Any], context: Mapping[str, Any]) -> Derived:
    """The plan's scheduled treatment hours per week, from its interventions, checked against the ASAM intensity
    of the enrollment's program (TERMINOLOGY.md §1.1: level 2.1 is 9-19 h/week for adults, 6-19 for adolescents)."""
    out = Derived(record)
    minutes = 0.0
    for entry in record.get("interventions") or []:
        per_week = entry["frequency"] * DAYS["wk"] / (entry["period"] * DAYS[entry["period_unit"]])
        minutes += per_week * (entry.get("minutes") or 0)
    hours = round(minutes / 60, 2)
    record["weekly_treatment_hours"] = hours
    intensity = tables["intensity"]
    group = context.get("age_group", "adult")
    limits = intensity[group]
    if hours < limits["min"]:
        out.warnings.append(
            Issue(
                "business-rule",
                f"scheduled treatment is {hours:g} h/week, below the {limits['min']:g} h/week of ASAM level 2.1 "
                f"for {group} programs",
                "interventions",
                severity="warning",
            )
        )
    elif hours > limits["max"]:
        out.warnings.append(
            Issue(
                "business-rule",
                f"scheduled treatment is {hours:g} h/week, above the {limits['max']:g} h/week of ASAM level 2.1; "
                f"consider level {limits['above']}",
                "interventions",
                severity="warning",
            )
        )
    record["intensity_warnings"] = [w.diagnostics for w in out.warnings]
    if not record["intensity_warnings"]:
        del record["intensity_warnings"]
    return out


def goal_keys(record: dict[str, Any], tables: Mapping[str, Any], context: Mapping[str, Any]) -> Derived:
    """Goal keys are unique, and every intervention names goals of this plan."""
    out = Derived(record)
    keys: dict[str, int] = {}
    for n, goal in enumerate(record.get("goals") or []):
        if goal["key"] in keys:
            out.errors.append(
                Issue(
                    "invariant",
                    f"goal key '{goal['key']}' is already used by goals[{keys[goal['key']]}]",
                    f"goals[{n}].key",
                )
            )
        keys.setdefault(goal["key"], n)
    for n, entry in enumerate(record.get("interventions") or []):
        for g, key in enumerate(entry.get("goals") or []):
            if key not in keys:
                allowed = ", ".join(keys) or "(the plan has no goals)"
                out.errors.append(
                    Issue(
                        "invariant",
                        f"unknown goal key '{key}'; the plan's goals are: {allowed}",
                        f"interventions[{n}].goals[{g}]",
                    )
                )
    return out


RULES: dict[str, Callable[[dict[str, Any], Mapping[str, Any], Mapping[str, Any]], Derived]] = {
    "instrument-scores": instrument_scores,
    "weekly-hours": weekly_hours,
    "goal-keys": goal_keys,
}


def apply(
    names: list[str], record: Mapping[str, Any], tables: Mapping[str, Any], context: Mapping[str, Any]
) -> Derived:
    result = Derived(copy.deepcopy(dict(record)))
    for name in names:
        step = RULES[name](result.record, tables, context)
        result.warnings.extend(step.warnings)
        result.errors.extend(step.errors)
    return result


def diagnosis_codes(record: dict[str, Any], tables: Mapping[str, Any], context: Mapping[str, Any]) -> Derived:
    """ICD-10-CM diagnoses must be billable codes of the current CMS tabular (simple-icd-10-cm)."""
    icd = _icd10cm()
    out = Derived(record)
    for n, diagnosis in enumerate(record.get("diagnoses") or []):
        if diagnosis.get("system") != "icd-10-cm":
            continue
        issue = _icd10cm_issue(icd, diagnosis.get("code", ""), f"diagnoses[{n}].code")
        if issue is not None:
            out.errors.append(issue)
    return out


def _icd10cm_issue(icd: Any, code: str, where: str) -> Issue | None:
    if not icd.is_valid_item(code):
        return Issue("code-invalid", f"'{code}' is not an ICD-10-CM code", where)
    if not icd.is_leaf(code):
        children = icd.get_children(code)[:3]
        return Issue(
            "code-invalid",
            f"'{code}' is an ICD-10-CM category, not a billable code; use one of its codes "
            f"(e.g. {', '.join(children)})",
            where,
        )
    return None


RULES["diagnosis-codes"] = diagnosis_codes


def indication_code(record: dict[str, Any], tables: Mapping[str, Any], context: Mapping[str, Any]) -> Derived:
    """A medication's ICD-10-CM indication must be a billable code of the current CMS tabular, as a diagnosis."""
    out = Derived(record)
    indication = record.get("indication") or {}
    if indication.get("system") == "icd-10-cm":
        issue = _icd10cm_issue(_icd10cm(), indication.get("code", ""), "indication.code")
        if issue is not None:
            out.errors.append(issue)
    return out


def medication_fields(record: dict[str, Any], tables: Mapping[str, Any], context: Mapping[str, Any]) -> Derived:
    """Fields the resource a source maps to has no place for (table not_recorded: source -> {field: why}) are
    refused rather than dropped."""
    out = Derived(record)
    source = record.get("source")
    for name, why in (tables.get("not_recorded", {}).get(source) or {}).items():
        if record.get(name) is not None:
            out.errors.append(Issue("invariant", f"not recorded for a medication {source}: {why}", name))
    return out


def expected_positives(record: dict[str, Any], tables: Mapping[str, Any], context: Mapping[str, Any]) -> Derived:
    """A positive drug screen result that a medication the patient is recorded as taking explains is expected, not a
    relapse signal: an information issue says so (the drug screen Observation says so too: session.yaml reads the
    same context). context["medications"]: the enrollment's medication records (functions.explained_by)."""
    out = Derived(record)
    screen = record.get("drug_screen")
    if not isinstance(screen, dict):
        return out
    medications = context.get("medications") or []
    for n, result in enumerate(screen.get("results") or []):
        medication = functions.explaining_medication(result, str(screen.get("collected_at", "")), medications)
        if medication is None:
            continue
        out.warnings.append(
            Issue(
                "informational",
                f"the positive {result['analyte']} result is expected: the patient is recorded as taking "
                f"{medication['medication']} (medication {medication['id']}), so it is not a relapse signal",
                f"drug_screen.results[{n}]",
                severity="information",
            )
        )
    return out


RULES["indication-code"] = indication_code
RULES["medication-fields"] = medication_fields
RULES["expected-positives"] = expected_positives


@functools.cache
def _icd10cm() -> Any:
    # simple-icd-10-cm reads its bundled tabular through a deprecated importlib.resources call at import.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import simple_icd_10_cm

    return simple_icd_10_cm
