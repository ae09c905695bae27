"""/fhir/AuditEvent: the audit log read as AuditEvent resources, each rendered on demand from its row (privacy/audit.py
``render``, IHE BALP-shaped): read by id, and search (https://hl7.org/fhir/R4/auditevent.html#search) by the
parameters of SEARCH_PARAMS with paging links (a next link continues after the page's last event, so paging
neither repeats nor skips one while events are written), ``_sort=date|-date`` (newest first by default), ``_total``,
``_summary``, ``_elements`` and ``Prefer: handling=lenient``. For administrators only (security/access.py
ADMIN_ONLY). AuditEvents are written by the service alone (SERVICE_WRITTEN), so the other interactions stay the
generic ones, which refuse them.

Searches are parsed by the FHIR search parser (r4/search.py) as on any type, then mapped onto the audit log's columns;
a parameter or modifier the log cannot answer is refused (400 not-supported), or dropped under lenient handling.
Before reading, this process's queued rows are committed (privacy/auditlog.py flush), so that what it audited so
far is found.
"""

from __future__ import annotations

from dataclasses import replace

import orjson

from iop_fhir.errors import BadRequest, NotFound
from iop_fhir.fhir import searchset
from iop_fhir.privacy import audit
from iop_fhir.privacy.auditlog import AuditWriter
from iop_fhir.r4 import search
from iop_fhir.r4.instants import now_us
from iop_fhir.r4.search import DateValue, Filter, ReferenceValue, SearchRequest, TokenValue
from iop_fhir.security.access import Access
from iop_fhir.store.base import AuditLog, AuditQuery, AuditRow, RecordedRange, SearchResult, StoredResource

AUDIT_EVENT = "AuditEvent"
# The search parameters the audit log answers, as the CapabilityStatement documents them.
SEARCH_PARAMS = {
    "_id": "the event's id",
    "date": "when the event was recorded (prefixes eq ne lt gt le ge sa eb)",
    "patient": "the patient the event is about (Patient/<id> or <id>); an event of several patients names none",
    "agent": "the client that asked (its client id), or the partner organisation it acted for (Organization/<id>, "
    "or <id>)",
    "entity": "a resource read, written or disclosed, or the patient (Type/<id>)",
    "action": "C R U D or E (http://hl7.org/fhir/audit-event-action)",
    "outcome": "0 4 8 or 12 (http://hl7.org/fhir/audit-event-outcome)",
    "type": "rest (a RESTful interaction) or 110106 (DICOM Export: an $export, or a delivery to a partner)",
    "subtype": "the RESTful interaction (read, vread, history, search, create, update, patch, delete, batch, "
    "transaction) or operation ($validate, an $export, its status, cancellation or files)",
}
_ACTION_SYSTEM = "http://hl7.org/fhir/audit-event-action"
_OUTCOME_SYSTEM = "http://hl7.org/fhir/audit-event-outcome"
_CODES = {**audit.REST_ACTIONS, **audit.EXPORT_ACTIONS}  # action name -> AuditEvent.action code
_TYPES = {
    (audit.AUDIT_EVENT_TYPE, "rest"): tuple(audit.REST_ACTIONS),
    (audit.DICOM, "110106"): tuple(audit.EXPORT_ACTIONS),
}
_SUBTYPES = {**{name: (name,) for name in audit.REST_ACTIONS}, "operation": ("operation", "export")}
_NEVER = ("id", "")  # an alternative no row matches (ids are never empty)


def read(access: Access, log: AuditLog, writer: AuditWriter | None, res_id: str) -> tuple[bytes, AuditRow]:
    """The AuditEvent of one row; 404 if there is none."""
    access.require(AUDIT_EVENT, "read")
    if writer is not None:
        writer.flush()
    row = log.audit_row(res_id) if search.is_id(res_id) else None
    if row is None:
        raise NotFound(f"{AUDIT_EVENT}/{res_id[:80]} is not known")
    return orjson.dumps(audit.render(row)), row


def search_bundle(
    access: Access,
    log: AuditLog,
    writer: AuditWriter | None,
    params: list[tuple[str, str]],
    *,
    lenient: bool,
    base_url: str,
    default_count: int,
    max_count: int,
) -> tuple[bytes, list[AuditRow]]:
    """The searchset Bundle of one page of AuditEvents, and the rows it holds."""
    access.require(AUDIT_EVENT, "search-type")
    request = search.parse(
        AUDIT_EVENT, params, lenient=lenient, default_count=default_count, max_count=max_count, base_url=base_url
    )
    request, query = _query(request, lenient)
    if writer is not None:
        writer.flush()
    rows, total = log.audit_rows(replace(query, count=query.count + 1 if query.count else 0))
    has_more = len(rows) > request.count
    rows = rows[: request.count]
    matches = [
        StoredResource(AUDIT_EVENT, row.id, 1, row.recorded, False, orjson.dumps(audit.render(row))) for row in rows
    ]
    result = SearchResult(matches=matches, total=total, has_more=has_more)
    if has_more and rows:  # the next page continues after this one's last row (searchset.py links to it)
        result.next_cursor = search.Cursor(now_us(), False, (rows[-1].recorded,), rows[-1].id)
    return searchset.searchset_bundle(request, result, base_url), rows


def _query(request: SearchRequest, lenient: bool) -> tuple[SearchRequest, AuditQuery]:
    """The audit log's query for a parsed search, and the search less what lenient handling dropped."""
    if request.includes:
        key = request.includes[0].render()[0]
        raise BadRequest(f"{key} is not supported on {AUDIT_EVENT}", key, code="not-supported")
    oldest_first = False
    if request.sort:
        if len(request.sort) > 1 or request.sort[0].param != "date":
            raise BadRequest(f"{AUDIT_EVENT} sorts by date (_sort=date or -date) only", "_sort", code="not-supported")
        oldest_first = not request.sort[0].descending
    where: list[tuple[tuple[str, str], ...]] = []
    recorded: list[tuple[RecordedRange, ...]] = []
    kept: list[Filter] = []
    dropped: list[str] = []
    for found in request.filters:
        problem = _unsupported(found)
        if problem is not None:
            if not lenient:
                raise BadRequest(problem, found.name, code="not-supported")
            dropped.append(found.name)
            continue
        kept.append(found)
        if found.param == "date":
            recorded.append(tuple(r for value in found.values for r in _ranges(value)))
        else:
            where.append(tuple(a for value in found.values for a in _alternatives(found, value)) or (_NEVER,))
    if dropped:
        request = replace(request, filters=tuple(kept), ignored=request.ignored + tuple(dropped))
    count = 0 if request.summary == "count" else request.count
    after = None
    if request.cursor is not None:
        keys = request.cursor.keys
        if (
            request.cursor.missing
            or len(keys) != 1
            or type(keys[0]) is not int
            or not search.is_id(request.cursor.res_id)
        ):
            raise BadRequest("_cursor: not a page cursor of this search", "_cursor")
        after = (keys[0], request.cursor.res_id)
    query = AuditQuery(
        where=tuple(where),
        recorded=tuple(recorded),
        oldest_first=oldest_first,
        offset=request.offset,
        count=count,
        total=request.wants_total,
        after=after,
    )
    return request, query


def _unsupported(found: Filter) -> str | None:
    if found.param not in SEARCH_PARAMS:
        return f"Search parameter '{found.param}' is not supported on {AUDIT_EVENT}"
    if found.chain is not None:
        return f"'{found.name}': chained parameters are not supported on {AUDIT_EVENT}"
    if found.modifier is not None:
        return f"'{found.name}': modifiers are not supported on {AUDIT_EVENT}"
    return None


def _ranges(value: object) -> tuple[RecordedRange, ...]:
    """https://hl7.org/fhir/R4/search.html#prefix, for a point in time against the value's range."""
    assert isinstance(value, DateValue)
    low, high = value.low, value.high
    return {
        "eq": ((low, high),),
        "ne": ((None, low - 1), (high + 1, None)),
        "lt": ((None, low - 1),),
        "eb": ((None, low - 1),),
        "gt": ((high + 1, None),),
        "sa": ((high + 1, None),),
        "le": ((None, high),),
        "ge": ((low, None),),
    }[value.prefix]


def _alternatives(found: Filter, value: object) -> tuple[tuple[str, str], ...]:
    """The (field, value) alternatives of one value of a parameter; none: it matches no row."""
    if isinstance(value, ReferenceValue):
        return _reference(found, value)
    assert isinstance(value, TokenValue)
    code = value.code
    if code is None:
        return ()
    if found.param == "_id":
        return (("id", code),)
    if found.param == "action":
        if value.system not in (None, _ACTION_SYSTEM):
            return ()
        return tuple(("action", name) for name, action in _CODES.items() if action == code)
    if found.param == "outcome":
        return (("outcome", code),) if value.system in (None, _OUTCOME_SYSTEM) and code in audit.OUTCOMES else ()
    if found.param == "type":
        return tuple(
            ("action", a)
            for (system, kind), actions in _TYPES.items()
            if kind == code and value.system in (None, system)
            for a in actions
        )
    if value.system not in (None, audit.RESTFUL_INTERACTION):  # subtype
        return ()
    return tuple(("action", a) for a in _SUBTYPES.get(code, ()))


def _reference(found: Filter, value: ReferenceValue) -> tuple[tuple[str, str], ...]:
    if value.res_id is None:  # an absolute URL: no row refers to another server
        return ()
    if found.param == "patient":
        return (("patient", f"Patient/{value.res_id}"),)
    if found.param == "agent":
        if value.res_type is None:
            return (("client_id", value.res_id), ("on_behalf_of", f"Organization/{value.res_id}"))
        return (("on_behalf_of", f"Organization/{value.res_id}"),) if value.res_type == "Organization" else ()
    if value.res_type is None:
        raise BadRequest(f"{found.name}: name the resource as Type/id ('{found.raw[:100]}')", found.name)
    return (("entity", f"{value.res_type}/{value.res_id}"),)
