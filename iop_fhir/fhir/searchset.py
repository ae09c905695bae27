"""Builds the searchset Bundle of a search as JSON bytes, splicing in the stored resource bytes unparsed.

https://hl7.org/fhir/R4/bundle.html, https://hl7.org/fhir/R4/search.html#return. A stored resource is parsed
only when ``_summary`` or ``_elements`` asks for a subset of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import orjson

from iop_fhir.errors import Issue, operation_outcome
from iop_fhir.r4 import search as search_rules
from iop_fhir.r4.search import SearchRequest
from iop_fhir.store.base import SearchResult, StoredResource

SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
_ALWAYS = frozenset({"resourceType", "id", "meta"})  # kept in every subset


def searchset_bundle(request: SearchRequest, result: SearchResult, base_url: str, *, path: str | None = None) -> bytes:
    """The Bundle (type searchset) of one page: ``total`` when counted, self/first/previous/next/last links
    (absolute, ``{base_url}/{path}?{canonical query}``; ``path`` is the type unless a compartment's), the matches
    then the included resources (``search.mode`` match / include), and an outcome entry naming the parameters
    ignored as lenient."""
    base = base_url.rstrip("/")
    envelope: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if result.total is not None:
        envelope["total"] = result.total
    envelope["link"] = _links(request, result, f"{base}/{path or request.res_type}?")
    entries: list[bytes] = []
    if request.summary != "count":
        entries += [_entry(base, res, "match", request, match=True) for res in result.matches if res.content]
        entries += [_entry(base, res, "include", request, match=False) for res in result.included if res.content]
    issues = [Issue("not-supported", f"Parameter '{n}' was ignored", n, "warning") for n in request.ignored]
    if result.included_cut:  # never set for _summary=count, which includes nothing
        issues += [
            Issue(
                "too-costly",
                f"{name} found more resources than one page includes ({search_rules.MAX_INCLUDED:,}): the first "
                "by type and id are included; search their type directly to page through them all",
                name,
                "warning",
            )
            for name in sorted({"_revinclude" if rule.reverse else "_include" for rule in request.includes})
        ]
    if issues:
        entries.append(orjson.dumps({"resource": operation_outcome(issues), "search": {"mode": "outcome"}}))
    head = orjson.dumps(envelope)
    if not entries:
        return head
    return head[:-1] + b',"entry":[' + b",".join(entries) + b"]}"


def _links(request: SearchRequest, result: SearchResult, prefix: str) -> list[dict[str, str]]:
    """https://hl7.org/fhir/R4/http.html#paging"""
    links = [{"relation": "self", "url": prefix + request.query()}]
    count = request.count
    if request.summary == "count" or count == 0:
        return links
    links.append({"relation": "first", "url": prefix + request.query(offset=0)})
    # Pages reached by cursor have no previous link (the cursor only goes forward; FHIR lets a server omit it).
    if request.offset > 0 and request.cursor is None:
        links.append({"relation": "previous", "url": prefix + request.query(offset=max(0, request.offset - count))})
    if result.next_cursor is not None:
        links.append({"relation": "next", "url": prefix + request.query(cursor=result.next_cursor)})
    elif result.has_more:
        links.append({"relation": "next", "url": prefix + request.query(offset=request.offset + count)})
    if result.total is not None:
        links.append(
            {
                "relation": "last",
                "url": prefix + request.query(offset=max(0, result.total - 1) // count * count),
            }
        )
    return links


def _entry(base: str, res: StoredResource, mode: str, request: SearchRequest, *, match: bool) -> bytes:
    assert res.content is not None
    content = res.content
    # _elements names elements of the searched type: it trims the matches, not the included resources.
    elements = request.elements if match else ()
    if elements or request.summary in ("true", "text", "data"):
        content = subset(content, res.res_type, request.summary, elements)
    return (
        b'{"fullUrl":'
        + orjson.dumps(f"{base}/{res.res_type}/{res.res_id}")
        + b',"resource":'
        + content
        + b',"search":{"mode":"'
        + mode.encode()
        + b'"}}'
    )


def subset(content: bytes, res_type: str, summary: str | None, elements: tuple[str, ...]) -> bytes:
    """The resource reduced as ``_summary`` (true, text, data) or ``_elements`` ask, tagged SUBSETTED
    (https://hl7.org/fhir/R4/search.html#summary, #elements): ``resourceType``, ``id``, ``meta`` and the
    mandatory top-level elements are always kept."""
    resource: dict[str, Any] = orjson.loads(content)
    shape = _shape(res_type)
    if summary == "data":
        keep = lambda name: name != "text"  # noqa: E731
    elif summary == "text":
        keep = lambda name: name in _ALWAYS or name == "text" or name in shape.mandatory  # noqa: E731
    elif summary == "true":
        if not shape.known:  # no definition to tell summary elements apart: only the narrative goes
            keep = lambda name: name != "text"  # noqa: E731
        else:
            keep = lambda name: name in _ALWAYS or name in shape.summary or name in shape.mandatory  # noqa: E731
    else:
        wanted = frozenset(elements)
        keep = lambda name: name in _ALWAYS or name in wanted or name in shape.mandatory  # noqa: E731
    trimmed = {k: v for k, v in resource.items() if k == "resourceType" or keep(shape.element(k))}
    meta = dict(trimmed.get("meta") or {})
    tags = list(meta.get("tag") or [])
    if not any(t.get("system") == SUBSETTED["system"] and t.get("code") == "SUBSETTED" for t in tags):
        tags.append(dict(SUBSETTED))
    meta["tag"] = tags
    trimmed["meta"] = meta
    ordered = {"resourceType": trimmed.pop("resourceType", res_type)}
    if "id" in trimmed:
        ordered["id"] = trimmed.pop("id")
    ordered["meta"] = trimmed.pop("meta")
    ordered.update(trimmed)
    return orjson.dumps(ordered)


@dataclass(frozen=True)
class _Shape:
    """The top-level elements of one resource type: which are in the summary, which are mandatory, and which
    JSON keys belong to a choice element (``valueQuantity`` -> ``value``)."""

    known: bool
    summary: frozenset[str]
    mandatory: frozenset[str]
    choices: dict[str, str]

    def element(self, key: str) -> str:
        name = key[1:] if key.startswith("_") else key  # "_status" carries the extensions of "status"
        return self.choices.get(name, name)


@cache
def _shape(res_type: str) -> _Shape:
    # The element flags come from the fhir.resources (R4B) models, the only structure definitions the service
    # carries; the R4-only types they lack are subsetted without knowing their summary elements.
    try:
        from fhir.resources.R4B import get_fhir_model_class

        model = get_fhir_model_class(res_type)
    except (KeyError, ValueError, ImportError):
        return _Shape(False, frozenset(), frozenset(), {})
    summary, mandatory, choices = set(), set(), {}
    for field in model.model_fields.values():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if not extra.get("element_property"):
            continue
        alias = field.alias or ""
        name = str(extra.get("one_of_many") or alias)
        if name != alias:
            choices[alias] = name
        if extra.get("summary_element_property"):
            summary.add(name)
        if field.is_required() or extra.get("element_required") or extra.get("one_of_many_required"):
            mandatory.add(name)
    return _Shape(True, frozenset(summary), frozenset(mandatory), choices)
