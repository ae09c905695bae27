"""Validates a FHIR R4 resource (JSON as plain data) and reports every problem at once, each with its path.

Implements https://hl7.org/fhir/R4/validation.html (structure, cardinality, value domains, required bindings)
and https://hl7.org/fhir/R4/references.html against the tables in ``fhir/data/validation.json`` (built by
``tools/validation_data.py``), then runs the ``fhir.resources.R4B`` model over it as a second opinion.
"""

from __future__ import annotations

import calendar
import difflib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from iop_fhir.errors import Issue
from iop_fhir.r4.definitions import resource_types

DATA = Path(__file__).parent / "data" / "validation.json"

# How an element's value is written in JSON, and what to check on it.
PRIMITIVE, COMPLEX, RESOURCE = 0, 1, 2
INT_RANGE = {"integer": (-(2**31), 2**31 - 1), "positiveInt": (1, 2**31 - 1), "unsignedInt": (0, 2**31 - 1)}
FORMAT_HINT = {
    "date": "YYYY, YYYY-MM or YYYY-MM-DD",
    "dateTime": "YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss[.fff](Z|+hh:mm|-hh:mm): "
    "a time needs seconds and a zone",
    "instant": "YYYY-MM-DDThh:mm:ss[.fff](Z|+hh:mm|-hh:mm)",
    "time": "hh:mm:ss[.fff]",
    "id": "1 to 64 characters from A-Z a-z 0-9 - .",
    "code": "no leading, trailing or repeated whitespace, no control characters",
    "uri": "no whitespace or control characters",
    "url": "no whitespace or control characters",
    "canonical": "no whitespace or control characters",
    "oid": "urn:oid:<digits and dots>",
    "uuid": "urn:uuid:<lower-case UUID>",
    "base64Binary": "base64",
    "string": "at most 1 MiB, no control characters other than tab, CR and LF",
    "markdown": "no control characters other than tab, CR and LF",
}
MAX_LISTED_CODES = 20
ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# https://hl7.org/fhir/R4/references.html#literal: "Type/id[/_history/vid]", absolute URL, URNs, "#id".
RELATIVE_REF_RE = re.compile(r"([A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(/_history/[A-Za-z0-9\-.]{1,64})?")
CONDITIONAL_REF_RE = re.compile(r"([A-Za-z]+)\?\S+")
SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
ABSOLUTE_REF_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s/?#]+\S*")
UUID_REF_RE = re.compile(r"urn:uuid:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
OID_REF_RE = re.compile(r"urn:oid:[0-2](\.(0|[1-9][0-9]*))+")
BASE64_RE = re.compile(r"[A-Za-z0-9+/=]*")
WHITESPACE_RE = re.compile(r"\s+", re.ASCII)
# https://hl7.org/fhir/R4/datatypes.html#string: no character below U+0020 other than tab, CR and LF, in any
# string-based primitive. The R4 regexes use \S, which (even in ASCII mode) lets NUL and the other control
# characters through; PostgreSQL cannot even store NUL in the text columns of the search index.
CONTROL_CHARS = r"\x00-\x08\x0b\x0c\x0e-\x1f"
CONTROL_RE = re.compile(f"[{CONTROL_CHARS}]")
XHTML_NS = 'xmlns="http://www.w3.org/1999/xhtml"'
# Bundle types whose entries may use conditional references (https://hl7.org/fhir/R4/http.html#trules).
CONDITIONAL_BUNDLES = frozenset({"transaction", "batch"})


@dataclass(frozen=True, slots=True)
class Primitive:
    """A primitive type: the JSON kind of its value and its R4 format (https://hl7.org/fhir/R4/datatypes.html)."""

    name: str
    json: str  # string | boolean | integer | decimal
    regex: re.Pattern[str] | None
    max_length: int | None


@dataclass(frozen=True, slots=True)
class Element:
    """One JSON property of a type, precomputed from its ElementDefinition."""

    name: str  # JSON name, choice types expanded (valueQuantity)
    path: str  # the definition path for messages (Observation.value[x])
    type: str  # FHIR type, profile table (SimpleQuantity) or backbone table (Observation.component)
    kind: int
    array: bool
    max: str
    prohibited: bool
    primitive: Primitive | None
    value_set: str | None  # a required binding that can be checked
    codes: frozenset[str] | None  # every code of that value set (for code elements)
    systems: dict[str, frozenset[str]] | None  # its codes by system (for Coding and CodeableConcept)
    targets: frozenset[str] | None  # Reference(...) target types; None = any
    choice: str | None  # the choice group (value for value[x])


@dataclass(frozen=True, slots=True)
class Table:
    """The elements of a resource, datatype or backbone element."""

    name: str
    is_resource: bool
    elements: dict[str, Element]
    required: tuple[tuple[str, tuple[str, ...], str], ...]  # (expression name, JSON names, min)


@dataclass(slots=True)
class Context:
    """What the walk needs to know about the resource it is in."""

    contained_ids: frozenset[str]
    conditional_refs: bool


@cache
def _data() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DATA.read_text())
    return data


@cache
def _primitive(name: str) -> Primitive | None:
    spec = _data()["primitives"].get(name)
    if spec is None:
        return None
    regex = spec.get("regex")
    if name == "base64Binary":
        regex = None  # the R4 regex backtracks badly on long data; checked by _check_base64
    elif regex and ("\\S" in regex or "[^\\s]" in regex):
        # string, markdown, code, uri, url, canonical: the control characters are refused in the same match
        # as the format, by a look-ahead over the whole value.
        regex = f"(?=[^{CONTROL_CHARS}]*\\Z)(?:{regex})"
    # re.ASCII: \s and \S as in the Java and XML Schema regexes the specification was written for.
    return Primitive(
        name=name,
        json=spec["json"],
        regex=re.compile(regex, re.ASCII) if regex else None,
        max_length=int(spec["maxLength"]) if "maxLength" in spec else None,
    )


@cache
def _value_set(url: str) -> dict[str, frozenset[str]] | None:
    systems = _data()["valueSets"].get(url)
    return None if systems is None else {s: frozenset(codes) for s, codes in systems.items()}


@cache
def _all_codes(url: str) -> frozenset[str] | None:
    systems = _value_set(url)
    return None if systems is None else frozenset().union(*systems.values())


# The id and extension of a primitive, in its "_name" sibling (https://hl7.org/fhir/R4/json.html#primitive).
PRIMITIVE_ELEMENT = "Element"


@cache
def table(name: str) -> Table | None:
    """The precomputed elements of a resource type, datatype, datatype profile or backbone element path."""
    raw: dict[str, list[Any]] | None = _data()["elements"].get(name)
    if name == PRIMITIVE_ELEMENT:
        raw = {"id": ["string", "0..1"], "extension": ["Extension", "0..*"]}
    if raw is None:
        return None
    is_resource = name in _r4_types()
    elements: dict[str, Element] = {}
    required: list[tuple[str, tuple[str, ...], str]] = []
    choice_groups: dict[str, list[str]] = {}
    for json_name, spec in raw.items():
        type_, min_max = spec[0], spec[1]
        value_set = spec[2] if len(spec) > 2 else None
        targets = spec[3] if len(spec) > 3 else None
        choice = spec[4] if len(spec) > 4 else None
        min_, max_ = min_max.split("..")
        if is_resource and json_name == "id":
            type_ = "id"  # Resource.id is System.String in the snapshot, of FHIR type id
        primitive = _primitive(type_)
        kind = PRIMITIVE if primitive else RESOURCE if type_ == "Resource" else COMPLEX
        checkable = value_set if value_set and _value_set(value_set) is not None else None
        elements[json_name] = Element(
            name=json_name,
            path=f"{name}.{choice}[x]" if choice else f"{name}.{json_name}",
            type=type_,
            kind=kind,
            array=max_ != "1",
            max=max_,
            prohibited=max_ == "0",
            primitive=primitive,
            value_set=checkable,
            codes=_all_codes(checkable) if checkable and type_ == "code" else None,
            systems=_value_set(checkable) if checkable and type_ in ("Coding", "CodeableConcept") else None,
            targets=frozenset(targets) if targets else None,
            choice=choice,
        )
        if choice:
            choice_groups.setdefault(choice, []).append(json_name)
            if min_ != "0" and len(choice_groups[choice]) == 1:
                required.append((choice, (), min_))
        elif min_ != "0":
            required.append((json_name, (json_name,), min_))
    required = [(n, names or tuple(choice_groups[n]), m) for n, names, m in required]
    return Table(name=name, is_resource=is_resource, elements=elements, required=tuple(required))


@cache
def _r4_types() -> frozenset[str]:
    return frozenset(_data()["resourceTypes"])


def validate(
    resource: object,
    *,
    expected_type: str | None = None,
    expected_id: str | None = None,
    require_id: bool = False,
    conditional_references: bool = False,
    model_check: bool = True,
) -> list[Issue]:
    """Every problem of ``resource`` as an R4 resource (https://hl7.org/fhir/R4/validation.html); [] if valid.

    ``expected_type``/``expected_id`` are the type and id the request URL names (an update must carry the
    URL's id, https://hl7.org/fhir/R4/http.html#update); ``require_id`` refuses a resource without id.
    ``conditional_references`` accepts ``Type?search`` references, as in a transaction entry whose references
    the caller resolves (https://hl7.org/fhir/R4/http.html#trules); they are always accepted inside a
    transaction or batch Bundle. ``model_check=False`` skips the fhir.resources.R4B pass, which costs several
    times the walk and only added base64 decoding checks in fuzzing.
    Each issue's ``expression`` is the FHIRPath of the offending element, with the JSON names of choice types
    (``Observation.valueQuantity.value``) and ``_name`` siblings reported at ``name``.
    """
    if not isinstance(resource, dict):
        return [Issue("structure", f"A resource must be a JSON object, not {json_type(resource)}", expected_type)]
    res_type = resource.get("resourceType")
    if not isinstance(res_type, str) or not res_type:
        return [Issue("structure", "The resource has no resourceType", "resourceType")]
    if res_type not in resource_types() or res_type not in _r4_types():
        return [
            Issue(
                "not-supported",
                f"Unknown resourceType '{res_type}': not a FHIR R4 resource type",
                "resourceType",
            )
        ]
    issues: list[Issue] = []
    if expected_type is not None and res_type != expected_type:
        issues.append(
            Issue(
                "invalid",
                f"resourceType '{res_type}' does not match the type in the URL, '{expected_type}'",
                f"{expected_type}.resourceType",
            )
        )
    res_id = resource.get("id")
    if expected_id is not None and res_id is not None and res_id != expected_id:
        issues.append(
            Issue("invalid", f"id in body {res_id!r} does not match id in URL {expected_id!r}", f"{res_type}.id")
        )
    elif (require_id or expected_id is not None) and res_id is None:
        wanted = f" (the URL says {expected_id!r})" if expected_id is not None else ""
        issues.append(Issue("required", f"The resource must have an id{wanted}", f"{res_type}.id"))
    walk = _Walker(issues)
    try:
        walk.resource(resource, res_type, res_type, Context(frozenset(), conditional_references), contained=False)
    except RecursionError:
        # e.g. Questionnaire.item nested hundreds deep: refuse it rather than fail the request
        issues.append(Issue("too-costly", "The resource is nested too deeply to be validated", res_type))
        return issues
    if model_check:
        issues += _model_issues(resource, res_type, issues, walk.unmodelled)
    return issues


class _Walker:
    """One pass over the JSON, checking each property against its precomputed Element."""

    __slots__ = ("issues", "unmodelled")

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = issues
        self.unmodelled: list[str] = []  # paths of nested resources fhir.resources.R4B has no model for

    def add(self, code: str, diagnostics: str, expression: str) -> None:
        self.issues.append(Issue(code, f"{expression}: {diagnostics}", expression))

    def resource(self, res: dict[str, Any], res_type: str, path: str, ctx: Context, *, contained: bool) -> None:
        tbl = table(res_type)
        if tbl is None:  # pragma: no cover - every R4 type has a table
            self.add("not-supported", f"no definition for resourceType '{res_type}'", path)
            return
        if not contained:
            contained_list = res.get("contained")
            ids = frozenset(
                c["id"]
                for c in (contained_list if type(contained_list) is list else ())
                if type(c) is dict and type(c.get("id")) is str
            )
            bundle_type = res.get("type") if res_type == "Bundle" else None
            conditional = ctx.conditional_refs or (type(bundle_type) is str and bundle_type in CONDITIONAL_BUNDLES)
            ctx = Context(ids, conditional)
        else:
            # dom-2, dom-4 (https://hl7.org/fhir/R4/domainresource.html#invs)
            if "contained" in res:
                self.add(
                    "invariant",
                    "a contained resource SHALL NOT contain resources (dom-2)",
                    path + ".contained",
                )
            meta = res.get("meta")
            if type(meta) is dict and ("versionId" in meta or "lastUpdated" in meta):
                self.add(
                    "invariant",
                    "a contained resource SHALL NOT have a meta.versionId or a meta.lastUpdated (dom-4)",
                    path + ".meta",
                )
        if path != res_type and _model_class(res_type) is None:
            self.unmodelled.append(path)
        self.object(res, tbl, path, ctx)

    def object(self, obj: dict[str, Any], tbl: Table, path: str, ctx: Context, *, has_value: bool = False) -> None:
        """Checks a JSON object against ``tbl``; ``has_value``: a primitive's ``_name`` with a value."""
        elements = tbl.elements
        if not has_value and (not obj or (len(obj) == 1 and "id" in obj)):
            self.add("structure", "an element must have a value or children (empty objects are not allowed)", path)
        choices: dict[str, str] | None = None
        for key, value in obj.items():
            el = elements.get(key)
            if el is None:
                if key.startswith("_"):
                    self.primitive_extension(obj, key, value, tbl, path, ctx)
                elif not (key == "resourceType" and tbl.is_resource):
                    self.unknown(key, tbl, path)
                continue
            epath = f"{path}.{key}"
            if el.choice:
                if choices is None:
                    choices = {}
                other = choices.setdefault(el.choice, key)
                if other != key:
                    self.add(
                        "structure",
                        f"only one of {el.path} may be present, found '{other}' and '{key}'",
                        epath,
                    )
            if el.prohibited:
                self.add("structure", f"{el.path} is not allowed here (max 0)", epath)
                continue
            if value is None:
                self.add("structure", "null is not allowed: leave the element out instead", epath)
            elif el.array:
                if type(value) is not list:
                    self.add(
                        "structure",
                        f"{el.path} repeats (max {el.max}): its value must be a JSON array, not {json_type(value)}",
                        epath,
                    )
                    self.value(value, el, epath, ctx)
                elif not value:
                    self.add("structure", "an empty array is not allowed: leave the element out instead", epath)
                else:
                    ext = obj.get("_" + key) if el.kind == PRIMITIVE else None
                    for i, item in enumerate(value):
                        if item is None:
                            # a null is a placeholder for an item that only has an id or extensions
                            if not (type(ext) is list and i < len(ext) and isinstance(ext[i], dict)):
                                self.add(
                                    "structure",
                                    "null is not allowed in an array unless the matching _" + key + " item is set",
                                    f"{epath}[{i}]",
                                )
                        else:
                            self.value(item, el, f"{epath}[{i}]", ctx)
            elif type(value) is list:
                self.add(
                    "structure",
                    f"{el.path} does not repeat (max 1): its value must be a single value, not an array",
                    epath,
                )
            else:
                self.value(value, el, epath, ctx)
        if tbl.name == "Extension" and ("extension" in obj) == any(k.startswith("value") for k in obj):
            # ext-1 (https://hl7.org/fhir/R4/extensibility.html#Extension)
            self.add("invariant", "an extension must have either extensions or a value[x], not both (ext-1)", path)
        for name, keys, min_ in tbl.required:
            if not any(k in obj or "_" + k in obj for k in keys):
                what = f"{tbl.name}.{name}[x]" if len(keys) > 1 or keys[0] != name else f"{tbl.name}.{name}"
                self.add("required", f"{what} is required (min {min_}) but missing", f"{path}.{name}")

    def unknown(self, key: str, tbl: Table, path: str) -> None:
        close = difflib.get_close_matches(key, list(tbl.elements), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        self.add("structure", f"unknown element '{key}': {tbl.name} has no such element{hint}", f"{path}.{key}")

    def primitive_extension(
        self, obj: dict[str, Any], key: str, value: Any, tbl: Table, path: str, ctx: Context
    ) -> None:
        """``_name``: the id and extensions of primitive ``name`` (https://hl7.org/fhir/R4/json.html#primitive)."""
        name = key[1:]
        el = tbl.elements.get(name)
        if el is None or el.kind != PRIMITIVE:
            self.unknown(key, tbl, path)
            return
        epath = f"{path}.{name}"
        element = table(PRIMITIVE_ELEMENT)
        assert element is not None
        if el.array:
            if type(value) is not list:
                self.add("structure", f"{key} must be a JSON array matching {name}", epath)
                return
            values = obj.get(name)
            if type(values) is list and len(values) != len(value):
                self.add(
                    "structure",
                    f"{key} must have as many items as {name} ({len(value)} vs {len(values)}), with null as filler",
                    epath,
                )
            for i, item in enumerate(value):
                if item is None:
                    if not (type(values) is list and i < len(values) and values[i] is not None):
                        self.add(
                            "structure",
                            f"{name}[{i}] has neither a value nor an id or extension",
                            f"{epath}[{i}]",
                        )
                elif type(item) is not dict:
                    self.add(
                        "structure",
                        f"{key} items must be JSON objects, not {json_type(item)}",
                        f"{epath}[{i}]",
                    )
                else:
                    has_value = type(values) is list and i < len(values) and values[i] is not None
                    self.object(item, element, f"{epath}[{i}]", ctx, has_value=has_value)
        elif type(value) is not dict:
            self.add("structure", f"{key} must be a JSON object (id and extension), not {json_type(value)}", epath)
        else:
            self.object(value, element, epath, ctx, has_value=obj.get(name) is not None)

    def value(self, value: Any, el: Element, path: str, ctx: Context) -> None:
        if el.kind == PRIMITIVE:
            prim = el.primitive
            assert prim is not None
            if _check_primitive(value, prim, path, self.add) and el.codes is not None and value not in el.codes:
                self.add("code-invalid", _not_in_value_set(value, el, None), path)
        elif type(value) is not dict:
            self.add("structure", f"{el.path} must be a JSON object, not {json_type(value)}", path)
        elif el.kind == RESOURCE:
            res_type = value.get("resourceType")
            if not isinstance(res_type, str) or res_type not in _r4_types():
                what = f"unknown resourceType {res_type!r}" if res_type is not None else "no resourceType"
                self.add("structure", f"a resource is expected here, but it has {what}", path)
                return
            self.resource(value, res_type, path, ctx, contained=el.name == "contained")
        else:
            tbl = table(el.type)
            if tbl is None:  # pragma: no cover - the build writes a table for every complex type
                return
            self.object(value, tbl, path, ctx)
            if el.type == "Reference":
                self.reference(value, el, path, ctx)
            elif el.systems is not None:
                if el.type == "Coding":
                    self.coding(value, el, path)
                else:
                    codings = value.get("coding")
                    if type(codings) is list:
                        for i, coding in enumerate(codings):
                            if type(coding) is dict:
                                self.coding(coding, el, f"{path}.coding[{i}]")

    def coding(self, coding: dict[str, Any], el: Element, path: str) -> None:
        """A Coding under a required binding must hold a code of the value set for the value set's systems."""
        system, code = coding.get("system"), coding.get("code")
        assert el.systems is not None
        codes = el.systems.get(system) if isinstance(system, str) else None
        if codes is not None and isinstance(code, str) and code not in codes:
            self.add("code-invalid", _not_in_value_set(code, el, system), f"{path}.code")

    def reference(self, ref: dict[str, Any], el: Element, path: str, ctx: Context) -> None:
        """https://hl7.org/fhir/R4/references.html: the forms of a literal reference, and its target types."""
        value = ref.get("reference")
        if not isinstance(value, str) or not value:
            return
        rpath = path + ".reference"
        if value.startswith("#"):
            if len(value) > 1 and value[1:] not in ctx.contained_ids:
                self.add("value", f"'{value}' does not match the id of a contained resource", rpath)
            return
        if value.startswith("urn:"):
            if not (UUID_REF_RE.fullmatch(value) or OID_REF_RE.fullmatch(value)):
                self.add("value", f"'{_short(value)}' is neither a valid urn:uuid: nor urn:oid: reference", rpath)
            return
        if SCHEME_RE.match(value):
            if not ABSOLUTE_REF_RE.fullmatch(value):
                self.add("value", f"'{_short(value)}' is not a valid absolute URL", rpath)
            return
        m = RELATIVE_REF_RE.fullmatch(value)
        if m is None:
            m = CONDITIONAL_REF_RE.fullmatch(value)
            if m is not None and not ctx.conditional_refs:
                self.add(
                    "value",
                    f"'{_short(value)}' is a conditional reference ('Type?search'), only allowed in a "
                    "transaction (https://hl7.org/fhir/R4/http.html#trules); use 'Type/id'",
                    rpath,
                )
                return
        if m is None:
            self.add(
                "value",
                f"'{_short(value)}' is not a valid reference: use 'Type/id' (optionally '/_history/vid'), an "
                "absolute URL, 'urn:uuid:...', 'urn:oid:...' or '#id' of a contained resource",
                rpath,
            )
            return
        target = m.group(1)
        if target not in _r4_types():
            self.add("value", f"'{_short(value)}' refers to '{target}', which is not an R4 resource type", rpath)
        elif el.targets is not None and target not in el.targets:
            allowed = "|".join(sorted(el.targets))
            self.add("value", f"{el.path} may refer to {allowed} only, not {target}", rpath)


def _check_primitive(value: Any, prim: Primitive, path: str, add: Callable[[str, str, str], None]) -> bool:
    """Checks the JSON kind and the R4 format of a primitive; True if it is a well-formed value."""
    kind = prim.json
    if kind == "string":
        if type(value) is not str:
            add("structure", f"a {prim.name} must be a JSON string, not {json_type(value)}", path)
            return False
        if not value:
            add("value", "an empty string is not allowed: an element must have a value or children", path)
            return False
        if prim.regex is not None and not prim.regex.fullmatch(value):
            add("value", _bad_format(value, prim), path)
            return False
        if prim.name in ("string", "markdown") and value.isspace():
            add("value", "a string must contain non-whitespace content", path)
            return False
        if prim.max_length is not None and len(value) > prim.max_length:
            add("value", f"a {prim.name} may be at most {prim.max_length} characters long", path)
            return False
        name = prim.name
        if name in ("date", "dateTime", "instant") and len(value) >= 10 and not _real_date(value):
            add("value", f"'{value}' is not a calendar date", path)
            return False
        if name == "base64Binary" and not _base64(value):
            add("value", _bad_format(value, prim), path)
            return False
        if name == "xhtml" and CONTROL_RE.search(value):
            add("value", "the narrative contains a control character (below U+0020, other than tab, CR, LF)", path)
            return False
        if name == "xhtml" and not _xhtml_div(value):
            add(
                "value",
                'the narrative must be an XHTML <div xmlns="http://www.w3.org/1999/xhtml"> element with content',
                path,
            )
            return False
        return True
    if kind == "boolean":
        if type(value) is not bool:
            add("structure", f"a boolean must be JSON true or false, not {json_type(value)}", path)
            return False
        return True
    if type(value) is bool or not isinstance(value, int | float):
        add("structure", f"a {prim.name} must be a JSON number, not {json_type(value)}", path)
        return False
    if kind == "integer":
        if type(value) is not int:
            add("value", f"a {prim.name} must be a whole number, not {value}", path)
            return False
        low, high = INT_RANGE[prim.name]
        if not low <= value <= high:
            add("value", f"{value} is out of range for a {prim.name} ({low} to {high})", path)
            return False
    return True


def _base64(value: str) -> bool:
    """The R4 regex ``(\\s*([0-9a-zA-Z\\+/=]){4}\\s*)+`` without its backtracking: groups of 4."""
    packed = WHITESPACE_RE.sub("", value) if not BASE64_RE.fullmatch(value) else value
    return bool(packed) and len(packed) % 4 == 0 and BASE64_RE.fullmatch(packed) is not None


def _real_date(value: str) -> bool:
    try:
        year, month, day = int(value[0:4]), int(value[5:7]), int(value[8:10])
    except ValueError:  # pragma: no cover - the regex has matched already
        return False
    return day <= calendar.monthrange(year, month)[1]


def _xhtml_div(value: str) -> bool:
    text = value.strip()
    return text.startswith("<div") and text.endswith("</div>") and XHTML_NS in text[: text.find(">") + 1]


def _bad_format(value: str, prim: Primitive) -> str:
    hint = FORMAT_HINT.get(prim.name)
    return f"{_short(value)!r} is not a valid {prim.name}" + (f" ({hint})" if hint else "")


def _not_in_value_set(code: str, el: Element, system: str | None) -> str:
    assert el.value_set is not None
    systems = _value_set(el.value_set) or {}
    codes = sorted(systems.get(system, ())) if system is not None else sorted(_all_codes(el.value_set) or ())
    allowed = (
        "allowed: " + ", ".join(codes) if len(codes) <= MAX_LISTED_CODES else f"{len(codes)} codes, see the value set"
    )
    where = f" of system {system}" if system is not None else ""
    return f"'{_short(code)}' is not a code{where} in the required value set {el.value_set} ({allowed})"


def _short(value: str, limit: int = 80) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def json_type(value: Any, *, article: bool = True) -> str:
    """The JSON kind of a parsed value, for messages: "a string", "an object", "null" (or "string" without article)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        kind = "a boolean"
    elif isinstance(value, int | float):
        kind = "a number"
    elif isinstance(value, str):
        kind = "a string"
    elif isinstance(value, list):
        kind = "an array"
    elif isinstance(value, dict):
        kind = "an object"
    else:
        return type(value).__name__
    return kind if article else kind.split(" ", 1)[1]


# ---- fhir.resources.R4B as a second opinion ---------------------------------------------------------------
# The walk above is authoritative for the R4 structure (element names, cardinality, JSON kinds): R4B differs
# from R4 (18 R4 types missing, elements changed), and its models coerce ("true" for a boolean, "1" for a
# decimal), so its "unknown element", "missing" and shape errors are left to the walk. What the model adds is
# value checks done its own way (e.g. base64 decoding); those are reported unless the walk already
# found a problem at the same place.
_WALK_OWNS = frozenset(
    {
        "extra_forbidden",
        "missing",
        "model_field_validation.missing",
        "list_type",
        "model_validation_format",
        "model_type",
        "dict_type",
        "string_type",
        "bool_type",
        "bool_parsing",
        "int_type",
        "int_parsing",
        "float_type",
        "float_parsing",
        "decimal_type",
        "decimal_parsing",
    }
)


@cache
def _model_class(res_type: str) -> Any:
    """The fhir.resources.R4B model of ``res_type``, or None where R4B has none (e.g. MedicinalProduct)."""
    from fhir.resources.R4B import get_fhir_model_class

    try:
        return get_fhir_model_class(res_type)
    except (KeyError, ValueError, ImportError, AttributeError):
        return None


def _model_issues(
    resource: dict[str, Any], res_type: str, walk_issues: list[Issue], unmodelled: list[str]
) -> list[Issue]:
    model = _model_class(res_type)
    if model is None:
        return []
    from pydantic import ValidationError

    try:
        model.model_validate(resource)
    except ValidationError as exc:
        errors = exc.errors()
    except Exception:  # fhir.resources raises KeyError etc. on R4-only nested types: the walk stands
        return []
    else:
        return []
    seen = [i.expression for i in walk_issues if i.expression]
    out: list[Issue] = []
    for err in errors:
        if err["type"] in _WALK_OWNS:
            continue
        expression = _loc_to_fhirpath(res_type, err["loc"])
        if any(_within(expression, u) for u in unmodelled):
            continue  # inside a resource R4B does not model
        if any(_within(expression, s) or _within(s, expression) for s in seen):
            continue  # the walk reported this place (or a part of it) precisely
        msg = err["msg"].removeprefix("Value error, ")
        out.append(Issue("value", f"{expression}: {msg}", expression))
    return out


def _within(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith((ancestor + ".", ancestor + "["))


def _loc_to_fhirpath(res_type: str, loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as a FHIRPath: ('component', 1, 'code') -> Observation.component[1].code."""
    parts = [res_type]
    for step in loc:
        if isinstance(step, int):
            parts[-1] += f"[{step}]"
        elif step != "root" and step != "__root__":
            parts.append(step[1:] if step.startswith("_") else step)
    return ".".join(parts)
