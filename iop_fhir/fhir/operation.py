"""What FHIR operations ($export, $evaluate-measure) share: their POST form's Parameters body read as the query
string would give it (https://hl7.org/fhir/R4/operations.html#request), and the short quoting of a value in errors."""

from __future__ import annotations

from typing import Any

from iop_fhir.errors import BadRequest


def short(text: str) -> str:
    """A value as an error quotes it: at most 80 characters."""
    return text if len(text) <= 80 else text[:77] + "..."


def parameters(body: Any, operation: str) -> list[tuple[str, str]]:
    """The parameters of a POST body of ``operation``: a Parameters resource, each value as the query string would
    give it (a reference as its ``reference``)."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise BadRequest(f"a POST {operation} takes a Parameters resource", "Parameters")
    found: list[tuple[str, str]] = []
    listed = body.get("parameter") or []
    for index, parameter in enumerate(listed if isinstance(listed, list) else [None]):
        where = f"Parameters.parameter[{index}]"
        if not isinstance(parameter, dict) or not isinstance(parameter.get("name"), str):
            raise BadRequest("each parameter needs a name", where)
        values = [v for k, v in parameter.items() if k.startswith("value")]
        value = values[0] if len(values) == 1 else None
        if isinstance(value, dict):
            value = value.get("reference")
        if not isinstance(value, str):
            raise BadRequest(f"parameter {short(parameter['name'])} needs one string value", where)
        found.append((parameter["name"], value))
    return found
