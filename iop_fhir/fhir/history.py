"""History Bundles (https://hl7.org/fhir/R4/http.html#history), built from stored bytes without a model round trip."""

from __future__ import annotations

from urllib.parse import urlencode

import orjson

from iop_fhir.errors import BadRequest
from iop_fhir.r4.indexing import date_range
from iop_fhir.r4.instants import instant
from iop_fhir.r4.search import MAX_OFFSET, non_negative
from iop_fhir.store.base import StoredResource

_STATUS = {"POST": "201 Created", "PUT": "200 OK", "PATCH": "200 OK", "DELETE": "204 No Content"}


def history_bundle(
    versions: list[StoredResource],
    total: int,
    *,
    base_url: str,
    path: str,
    params: list[tuple[str, str]],
    count: int,
    offset: int,
) -> bytes:
    def link(relation: str, at: int) -> dict[str, str]:
        query = urlencode([*params, ("_count", str(count)), ("_offset", str(at))])
        return {"relation": relation, "url": f"{base_url}/{path}?{query}"}

    links = [link("self", offset)]
    if count and offset + count < total:  # _count=0 asks for the total only: no page to move to
        links.append(link("next", offset + count))
    if offset > 0:
        links.append(link("previous", max(0, offset - count)))
    envelope = orjson.dumps({"resourceType": "Bundle", "type": "history", "total": total, "link": links})
    entries = []
    for v in versions:
        url = f"{v.res_type}/{v.res_id}"
        request = {"method": v.method or "PUT", "url": url if v.method != "POST" else v.res_type}
        response = {
            "status": _STATUS.get(v.method or "PUT", "200 OK"),
            "etag": f'W/"{v.version_id}"',
            "lastModified": instant(v.last_updated),
        }
        head = orjson.dumps({"fullUrl": f"{base_url}/{url}", "request": request, "response": response})
        if v.content is not None:
            entries.append(head[:-1] + b',"resource":' + v.content + b"}")
        else:
            entries.append(head)
    return envelope[:-1] + b',"entry":[' + b",".join(entries) + b"]}"


def history_params(
    params: list[tuple[str, str]], *, default_count: int, max_count: int
) -> tuple[list[tuple[str, str]], int, int, int | None, int | None]:
    """``_count``, ``_offset``, ``_since`` and ``_at`` of a history request; anything else is a 400."""
    count, offset, since, at = default_count, 0, None, None
    kept: list[tuple[str, str]] = []
    for name, value in params:
        try:
            if name == "_count":
                count = min(non_negative(name, value), max_count)  # above the maximum: capped, not refused
                continue
            if name == "_offset":
                offset = non_negative(name, value)
                if offset > MAX_OFFSET:
                    raise BadRequest(f"_offset is beyond the deepest offset served, {MAX_OFFSET}", name)
                continue
            if name == "_since":
                since = date_range(value)[0]
            elif name == "_at":
                at = date_range(value)[1]
            elif name in ("_format", "_pretty"):
                continue
            else:
                raise BadRequest(
                    f"'{name}' is not a history parameter (use _count, _since, _at)",
                    name,
                    code="not-supported",
                )
        except ValueError as exc:
            raise BadRequest(f"{name} '{value}' is not valid", name) from exc
        kept.append((name, value))
    return kept, count, offset, since, at
