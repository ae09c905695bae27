"""History Bundles (https://hl7.org/fhir/R4/http.html#history), built from stored bytes without a model round trip."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from urllib.parse import urlencode

import orjson

from iop_fhir.errors import BadRequest
from iop_fhir.r4.indexing import date_range
from iop_fhir.r4.instants import instant
from iop_fhir.r4.search import MAX_OFFSET, is_id, non_negative
from iop_fhir.store.base import HistoryCursor, StoredResource

_STATUS = {"POST": "201 Created", "PUT": "200 OK", "PATCH": "200 OK", "DELETE": "204 No Content"}
CURSOR = "_cursor"


def encode_cursor(cursor: HistoryCursor) -> str:
    """The ``_cursor`` of a next link (opaque to clients)."""
    data = [cursor.snapshot, cursor.served, cursor.last_updated, cursor.version_id, cursor.res_type, cursor.res_id]
    return base64.urlsafe_b64encode(orjson.dumps(data)).decode().rstrip("=")


def decode_cursor(text: str) -> HistoryCursor:
    """The cursor ``text`` encodes; a 400 when it is not a history cursor of this server. A cursor only says where a
    page starts: what the page may hold is decided again on every page."""
    try:
        data = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        snapshot, served, last_updated, version_id, res_type, res_id = data
        if not (
            all(type(n) is int and 0 <= n < 2**63 for n in (snapshot, served, last_updated))
            and type(version_id) is int
            and 0 <= version_id < 2**31  # the column's range
            and isinstance(res_type, str)
            and res_type.isascii()
            and res_type.isalpha()
            and is_id(res_id)
        ):
            raise ValueError(text)
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise BadRequest(f"{CURSOR}: not a history page cursor of this server", CURSOR) from None
    return HistoryCursor(snapshot, served, last_updated, version_id, res_type, res_id)


@dataclass(frozen=True)
class HistoryQuery:
    """What a history request asks for: the parameters its links repeat, the page size, and where the page starts
    (``_offset`` on a first page, ``_cursor`` on the pages its next links lead to)."""

    params: list[tuple[str, str]]
    count: int
    offset: int = 0
    since: int | None = None
    at: int | None = None
    cursor: HistoryCursor | None = None


def history_bundle(
    versions: list[StoredResource],
    total: int | None,
    *,
    base_url: str,
    path: str,
    query: HistoryQuery,
    snapshot: int,
) -> bytes:
    """A history Bundle of ``versions``, one page of ``total``. Its next link continues by cursor after the page's
    last entry (from ``snapshot``, the time the paging's first page was read), so that following next links is as
    fast at any depth and stable while versions are written; a first page also links back by ``_offset``."""
    params, count = query.params, query.count

    def link(relation: str, position: list[tuple[str, str]]) -> dict[str, str]:
        return {
            "relation": relation,
            "url": f"{base_url}/{path}?{urlencode([*params, ('_count', str(count)), *position])}",
        }

    cursor = query.cursor
    served = cursor.served if cursor is not None else query.offset
    self_position = [(CURSOR, encode_cursor(cursor))] if cursor is not None else [("_offset", str(query.offset))]
    links = [link("self", self_position)]
    # _count=0 asks for the total only: no page to move to
    if count and len(versions) == count and (total is None or served + count < total):
        last = versions[-1]
        following = HistoryCursor(
            cursor.snapshot if cursor is not None else snapshot,
            served + count,
            last.last_updated,
            last.version_id,
            last.res_type,
            last.res_id,
        )
        links.append(link("next", [(CURSOR, encode_cursor(following))]))
    if cursor is None and query.offset > 0:
        links.append(link("previous", [("_offset", str(max(0, query.offset - count)))]))
    # Bundle.total is optional: left out when there are more versions than the store counts.
    bundle: dict[str, object] = {"resourceType": "Bundle", "type": "history"}
    if total is not None:
        bundle["total"] = total
    envelope = orjson.dumps({**bundle, "link": links})
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


def history_params(params: list[tuple[str, str]], *, default_count: int, max_count: int) -> HistoryQuery:
    """``_count``, ``_offset`` or ``_cursor``, ``_since`` and ``_at`` of a history request; anything else is a 400."""
    count, offset, since, at = default_count, 0, None, None
    cursor: HistoryCursor | None = None
    offset_given = False
    kept: list[tuple[str, str]] = []
    for name, value in params:
        try:
            if name == "_count":
                count = min(non_negative(name, value), max_count)  # above the maximum: capped, not refused
                continue
            if name == "_offset":
                offset, offset_given = non_negative(name, value), True
                if offset > MAX_OFFSET:
                    raise BadRequest(f"_offset is beyond the deepest offset served, {MAX_OFFSET}", name)
                continue
            if name == CURSOR:
                cursor = decode_cursor(value)
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
    if cursor is not None and offset_given:
        raise BadRequest(
            "_offset and _cursor cannot be used together: a next link's _cursor says where it starts", CURSOR
        )
    return HistoryQuery(kept, count, offset, since, at, cursor)
