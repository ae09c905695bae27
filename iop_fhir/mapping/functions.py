"""The derived values a mapping template may compute with {$fn: NAME, args: [...]}; all pure."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def minutes_between(start: str, end: str) -> int:
    return round((_instant(end) - _instant(start)).total_seconds() / 60)


def band(bands: Sequence[Mapping[str, Any]], score: float) -> str | None:
    """The first band whose `max` the score does not exceed (severity bands of an instrument)."""
    for entry in bands:
        if score <= entry["max"]:
            return str(entry["code"])
    return None


def date(text: str) -> str:
    return text[:10]


def hours(minutes: float) -> float:
    return round(minutes / 60, 2)


def count(items: Sequence[Any] | None) -> int:
    return len(items or [])


def ratio_percent(value: float) -> float:
    return round(value * 100, 2)


def percent_ratio(value: float) -> float:
    return round(value / 100, 4)


def first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def join(items: Sequence[Any] | None, separator: str = "; ") -> str | None:
    return separator.join(str(i) for i in items) if items else None


def prefix(text: str, value: Any) -> str:
    return f"{text}{value}"


def nth(items: Sequence[Any], index: int) -> Any:
    return items[index] if 0 <= index < len(items) else None


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "minutes_between": minutes_between,
    "band": band,
    "date": date,
    "hours": hours,
    "count": count,
    "ratio_percent": ratio_percent,
    "ratio_percent:inverse": percent_ratio,
    "first": first,
    "join": join,
    "prefix": prefix,
    "nth": nth,
}
