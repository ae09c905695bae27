"""The FHIR R4 definitions the service runs on, loaded once from the vendored data in ``fhir/data/``.

See ``tools/vendor_r4.py`` for where the data comes from and how to rebuild it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class SearchParam:
    """One SearchParameter as it applies to one resource type (https://hl7.org/fhir/R4/searchparameter.html)."""

    name: str
    type: str  # number | date | string | token | reference | composite | quantity | uri | special
    url: str
    expression: str | None = None  # FHIRPath, already narrowed to this resource type
    target: tuple[str, ...] = ()
    component: tuple[tuple[str, str], ...] = ()  # (definition url, expression) for composite parameters


@cache
def _search_data() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / "search-parameters.json").read_text())
    return data


@cache
def resource_types() -> frozenset[str]:
    """Every concrete R4 resource type."""
    return frozenset(_search_data()["resourceTypes"])


@cache
def search_params(res_type: str) -> dict[str, SearchParam]:
    """The search parameters the R4 specification defines for ``res_type`` (including Resource's ``_id`` etc.)."""
    raw: dict[str, dict[str, Any]] = _search_data()["params"].get(res_type, {})
    return {
        name: SearchParam(
            name=name,
            type=d["type"],
            url=d["url"],
            expression=d.get("expression"),
            target=tuple(d.get("target", ())),
            component=tuple((c["definition"], c["expression"]) for c in d.get("component", ())),
        )
        for name, d in raw.items()
    }
