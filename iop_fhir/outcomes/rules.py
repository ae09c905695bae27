"""The definitions the outcomes follow, read from mappings/outcomes/rules.yaml (data, like the terminology), and the
ASAM minimum of each program from the treatment-plan mapping and the program vocabulary."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from iop_fhir.mapping import terminology


@dataclass(frozen=True)
class Scale:
    """A symptom scale's response and remission definitions (rules.yaml `instruments`)."""

    response_reduction: float
    remission_below: int | None = None
    baseline_at_least: int | None = None


@dataclass(frozen=True)
class Rules:
    attended: frozenset[str]
    not_scheduled: frozenset[str]
    asam_minimum_hours: dict[str, float]
    not_treatment_hours: frozenset[str]
    instruments: dict[str, Scale]
    craving_flat_within: float
    goal_achieved: frozenset[str]
    first_visit_within_days: int
    accepted_events: frozenset[str]
    retention_days: tuple[int, ...]
    retained_reasons: frozenset[str]

    def minimum_hours(self, program: str | None) -> float:
        """The ASAM level 2.1 weekly minimum of a program (adolescents 6 hours, everyone else 9)."""
        return self.asam_minimum_hours.get(program or "", self.asam_minimum_hours["default"])


def parse(data: dict[str, Any], minimums: dict[str, float]) -> Rules:
    """The rules of rules.yaml, with each program's weekly minimum (``minimums``, "default" for a program not
    listed)."""
    return Rules(
        attended=frozenset(data["attended"]),
        not_scheduled=frozenset(data["not_scheduled"]),
        asam_minimum_hours=minimums,
        not_treatment_hours=frozenset(data["not_treatment_hours"]),
        instruments={k: Scale(**v) for k, v in data["instruments"].items()},
        craving_flat_within=float(data["craving_flat_within"]),
        goal_achieved=frozenset(data["goal_achieved"]),
        first_visit_within_days=int(data["first_visit_within_days"]),
        accepted_events=frozenset(data["accepted_events"]),
        retention_days=tuple(int(d) for d in data["retention_days"]),
        retained_reasons=frozenset(data["retained_reasons"]),
    )


def minimums(mappings: Path) -> dict[str, float]:
    """Each program's ASAM level 2.1 weekly minimum: the treatment-plan mapping's intensity `min` for the program's
    age group (CodeSystem iop-program, property age-group)."""
    plan = yaml.safe_load((mappings / "treatment-plan.yaml").read_text(encoding="utf-8"))
    intensity = plan["tables"]["intensity"]
    vocabulary = terminology.load(mappings / "terminology")
    found = {"default": float(intensity["adult"]["min"])}
    for code in vocabulary.codes("program"):
        concept = vocabulary.concept("program", code) or {}
        group = (concept.get("properties") or {}).get("age-group", "adult")
        found[code] = float(intensity[group]["min"])
    return found


def programs(mappings: Path) -> frozenset[str]:
    """The program codes outcomes may be asked for (CodeSystem iop-program of ``mappings``/terminology)."""
    return frozenset(terminology.load(mappings / "terminology").codes("program"))


@cache
def load(directory: Path) -> Rules:
    """The rules in ``directory``/rules.yaml (mappings/outcomes), the minimums from the mappings beside it."""
    data = yaml.safe_load((directory / "rules.yaml").read_text(encoding="utf-8"))
    return parse(data, minimums(directory.parent))
