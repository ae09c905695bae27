"""Mutating JSON documents for the robustness tests: every path into a document, and one change at a path."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def paths(node: Any, prefix: tuple[Any, ...] = (), *, max_depth: int | None = None) -> Iterator[tuple[Any, ...]]:
    """Every path into a document (the empty path first), down to ``max_depth`` levels if given."""
    yield prefix
    if max_depth is not None and len(prefix) >= max_depth:
        return
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, (*prefix, key), max_depth=max_depth)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from paths(value, (*prefix, i), max_depth=max_depth)


def mutate(node: Any, path: tuple[Any, ...], value: Any, how: str) -> Any:
    """The document with the element at ``path`` replaced by ``value``, deleted ("delete"), wrapped in an array
    ("wrap"), or ``value`` added beside it under an unknown name ("unknown"); changes ``node`` in place."""
    if not path:
        return value
    parent = node
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if how == "delete":
        del parent[last]
    elif how == "wrap":
        parent[last] = [parent[last]]
    elif how == "unknown" and isinstance(parent, dict):
        parent[f"x{last}"] = value
    else:
        parent[last] = value
    return node
