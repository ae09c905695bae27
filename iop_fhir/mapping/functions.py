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


def _cutoff(definition: Mapping[str, Any], gender: str | None) -> Mapping[str, Any] | None:
    """The positive cut-off of an instrument whose cut-off depends on the patient's gender (AUDIT-C), for this gender
    or, when it is not one the table names, its `default`; None for an instrument scored by `bands` alone."""
    by_gender = definition.get("cutoff_by_gender")
    if not by_gender:
        return None
    found: Mapping[str, Any] = by_gender.get(gender or "", by_gender["default"])
    return found


def screen(definition: Mapping[str, Any] | None, score: float | None, gender: str | None = None) -> str | None:
    """The interpretation of an instrument's total: its band (`bands`), or for an instrument with cut-offs by
    gender, positive-screen at or above the patient's cut-off and negative-screen below it."""
    if definition is None or score is None:
        return None
    cutoff = _cutoff(definition, gender)
    if cutoff is None:
        return band(definition.get("bands") or [], score)
    return "positive-screen" if score >= cutoff["at"] else "negative-screen"


def screen_text(definition: Mapping[str, Any] | None, score: float | None, gender: str | None = None) -> str | None:
    """The words of a gender-dependent interpretation: the result and which cut-off gave it (None otherwise)."""
    if definition is None or score is None:
        return None
    cutoff = _cutoff(definition, gender)
    if cutoff is None:
        return None
    result = "Positive screen" if score >= cutoff["at"] else "Negative screen"
    relation = "at or above" if score >= cutoff["at"] else "below"
    return f"{result}: total {score:g} is {relation} {cutoff['at']}, {cutoff['basis']}"


def positive_item(item_number: int, items: Sequence[int] | None) -> bool | None:
    """Whether item ``item_number`` (counted from 1) was answered above 0 (PHQ-9 item 9); None if not answered."""
    if not items or not 1 <= item_number <= len(items):
        return None
    return True if items[item_number - 1] > 0 else None


def item_key(instrument: str, item_number: int) -> str:
    """The key of an item Observation (`{instrument}.{index from 0}`) from the item's number (from 1)."""
    return f"{instrument}.{item_number - 1}"


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


def human_name(text: str | None) -> dict[str, Any] | None:
    """A person's name as the records give it ("Dana Whitfield, LCADC") as a HumanName: the credentials after
    the first comma are suffixes, the last word before it the family name, the words before that the given
    names; ``text`` keeps the whole (https://hl7.org/fhir/R4/datatypes.html#HumanName)."""
    if text is None or not text.strip():
        return None
    person, *credentials = (part.strip() for part in text.split(","))
    words = person.split()
    name: dict[str, Any] = {"text": text.strip()}
    if words:
        name["family"] = words[-1]
    if words[:-1]:
        name["given"] = words[:-1]
    suffix = [c for c in credentials if c]
    if suffix:
        name["suffix"] = suffix
    return name


def human_name_text(name: Mapping[str, Any]) -> str | None:
    """The inverse of human_name: the name as written."""
    text = name.get("text") if isinstance(name, Mapping) else None
    return text if isinstance(text, str) else None


def explained_by(result: Mapping[str, Any], collected_at: str, medications: Sequence[Mapping[str, Any]]) -> str | None:
    """The medication the patient is recorded as taking that explains a positive drug screen result, or None.

    ``medications``: the enrollment's medication records as the service gives them ($context.medications), each
    {id, medication, status, start, end, explains: [analyte, ...]}. One covers the collection day (the local date of
    ``collected_at``) when it started on or before it and either ends on or after it (not on hold) or, without an
    end, is still active."""
    found = explaining_medication(result, collected_at, medications)
    return None if found is None else str(found["medication"])


def explaining_medication(
    result: Mapping[str, Any], collected_at: str, medications: Sequence[Mapping[str, Any]]
) -> Mapping[str, Any] | None:
    """The medication record of explained_by (the first that covers the day, in the order given)."""
    if result.get("result") != "positive":
        return None
    day = collected_at[:10]
    for medication in medications or []:
        if result.get("analyte") in (medication.get("explains") or []) and _covers(medication, day):
            return medication
    return None


def _covers(medication: Mapping[str, Any], day: str) -> bool:
    if not day or str(medication.get("start") or "9999") > day:
        return False
    end = medication.get("end")
    if end is not None:
        return day <= str(end) and medication.get("status") != "on-hold"
    return medication.get("status") == "active"


def expected_note(medication: str, analyte: str) -> str:
    return (
        f"Expected result: the patient is recorded as taking {medication}, which explains a positive {analyte} "
        "screen; not a sign of relapse."
    )


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "explained_by": explained_by,
    "expected_note": expected_note,
    "minutes_between": minutes_between,
    "band": band,
    "screen": screen,
    "screen_text": screen_text,
    "positive_item": positive_item,
    "item_key": item_key,
    "date": date,
    "hours": hours,
    "count": count,
    "ratio_percent": ratio_percent,
    "ratio_percent:inverse": percent_ratio,
    "first": first,
    "join": join,
    "prefix": prefix,
    "nth": nth,
    "human_name": human_name,
    "human_name:inverse": human_name_text,
}
