"""The definitions the outcomes follow, read from mappings/outcomes/rules.yaml (data, like the terminology)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml


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
    expected_analytes: dict[str, frozenset[str]]
    medication_taken: frozenset[str]
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


def parse(data: dict[str, Any]) -> Rules:
    return Rules(
        attended=frozenset(data["attended"]),
        not_scheduled=frozenset(data["not_scheduled"]),
        asam_minimum_hours={str(k): float(v) for k, v in data["asam_minimum_hours"].items()},
        not_treatment_hours=frozenset(data["not_treatment_hours"]),
        expected_analytes={k: frozenset(v) for k, v in data["expected_analytes"].items()},
        medication_taken=frozenset(data["medication_taken"]),
        instruments={k: Scale(**v) for k, v in data["instruments"].items()},
        craving_flat_within=float(data["craving_flat_within"]),
        goal_achieved=frozenset(data["goal_achieved"]),
        first_visit_within_days=int(data["first_visit_within_days"]),
        accepted_events=frozenset(data["accepted_events"]),
        retention_days=tuple(int(d) for d in data["retention_days"]),
        retained_reasons=frozenset(data["retained_reasons"]),
    )


@cache
def load(directory: Path) -> Rules:
    """The rules in ``directory``/rules.yaml (mappings/outcomes)."""
    return parse(yaml.safe_load((directory / "rules.yaml").read_text(encoding="utf-8")))
