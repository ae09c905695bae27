"""JSON texts that name a key twice in one object.

FHIR JSON forbids it (https://hl7.org/fhir/R4/json.html), and for an /iop record it leaves unknowable which value was
meant; both APIs refuse such a body rather than keep the last value as JSON parsers do.
"""

from __future__ import annotations

import json
from typing import Any


class _Duplicated(dict):  # type: ignore[type-arg]
    """An object of a JSON text in which ``key`` appears more than once."""

    key = ""


def duplicate_key(data: bytes) -> str | None:
    """The path (``Patient.name[0].family``) of the first key given twice in one object of the JSON text ``data``,
    else None (https://hl7.org/fhir/R4/json.html: no duplicate names). The C parser of the standard library
    hands each object's pairs to the hook before they become a dict; the document is walked for the path only when
    an object had a repeat."""
    repeats = 0

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal repeats
        found = dict(items)
        if len(found) == len(items):
            return found
        repeats += 1
        marked = _Duplicated(found)
        seen: set[str] = set()
        marked.key = next(k for k, _ in items if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        return marked

    try:
        document = json.loads(data, object_pairs_hook=pairs)
        if not repeats:
            return None
        root = document.get("resourceType") if isinstance(document, dict) else None
        return _find_duplicate(document, root if isinstance(root, str) else "$")
    except RecursionError:  # nested deeper than Python's stack: refused for its depth (too-costly) further on
        return None


def _find_duplicate(value: Any, path: str) -> str | None:
    if isinstance(value, _Duplicated):
        return f"{path}.{value.key}"
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)):
                found = _find_duplicate(item, f"{path}.{key}")
                if found:
                    return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, (dict, list)):
                found = _find_duplicate(item, f"{path}[{index}]")
                if found:
                    return found
    return None
