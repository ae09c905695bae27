"""The query strings of the /iop list endpoints: known parameters only, each once, paging integers in range."""

from __future__ import annotations

import re
from collections.abc import Iterable

from flask import current_app, request

from iop_fhir.errors import BadRequest

_NUMBER = re.compile(r"[0-9]{1,18}")


def check_parameters(allowed: Iterable[str]) -> None:
    """Refuse an unknown or repeated parameter (400 naming it), and a query string that is not UTF-8."""
    allowed = tuple(allowed)
    try:
        names = list(request.args)
    except UnicodeDecodeError:
        raise BadRequest("the query string is not UTF-8 (percent-encode the UTF-8 bytes of a value)", "query") from None
    for name in names:
        if name not in allowed:
            raise BadRequest(f"unknown query parameter {name[:40]!r}; allowed: {', '.join(allowed)}", name or "query")
        if len(request.args.getlist(name)) > 1:
            raise BadRequest(f"{name} is given more than once", name)


def integer(name: str, default: int, maximum: int | None = None) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not _NUMBER.fullmatch(raw):
        raise BadRequest(f"{name} must be a non-negative integer, got {raw[:40]!r}", name)
    value = int(raw)
    if maximum is not None and value > maximum:
        raise BadRequest(f"{name} must be at most {maximum}, got {value}", name)
    return value


def paging() -> tuple[int, int]:
    """`offset` and `count` (default and maximum from the settings)."""
    settings = current_app.config["IOP_FHIR"]
    return integer("offset", 0), integer("count", settings.default_page_size, settings.max_page_size)
