"""Interprets mappings/*.yaml templates: an IOP record to FHIR resources, and those resources back to the record.

A template is FHIR JSON in which some values are expressions:

    "$a.b"                                  the record's field a.b (or a loop variable's: "$result.analyte")
    {$code: VOCAB, from: EXPR, as: coding|codings|concept|code|display, depends: {prop: EXPR}, text: EXPR}
                                            the translations of an IOP code through ConceptMap iop-VOCAB (display:
                                            the name of its first, for a text that goes with the code)
    {$ref: ROLE, key: EXPR, record: {kind: KIND, id: EXPR}, shared: [EXPR...], type: TYPE}
                                            a Reference to a resource produced from this or another record
    {$each: EXPR, as: NAME, do: TEMPLATE}   one list item per element of a list (inside a list)
    {$if: EXPR, then: TEMPLATE, else: TEMPLATE, is: VALUE}
    {$lookup: TABLE, key: EXPR, get: FIELD} a value from the mapping's tables (instrument codes, ...)
    {$fn: NAME, args: [EXPR...]}            a derived value (minutes between two times, a severity band, ...)
    {$text: "... {a.b} ..."}                text assembled from fields
    "$context.a"                            what the service knows of the record's enrollment when it maps it (the
                                            patient's gender, the care team's plan): read by `map`, never written
                                            back by `reverse`, for it is not part of the record

Every expression that names a record field can be read backwards, so `reverse` rebuilds the record from the
resources; derived values ($fn, $text) are recomputed rather than read back. `reverse` reads only what `map` wrote
(the golden tests' round trip); see the package docstring for why inbound referrals are read otherwise.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from iop_fhir.errors import Invalid, Issue
from iop_fhir.mapping import ids, rules
from iop_fhir.mapping.spec import MappingSpec, ResourceSpec
from iop_fhir.mapping.terminology import Terminology

MISSING: Any = object()
PROFILE_BASE = f"{ids.CANONICAL}/StructureDefinition/"
US_CORE_BASE = "http://hl7.org/fhir/us/core/StructureDefinition/"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
# TERMINOLOGY.md §6.2: the label set of a 42 CFR Part 2 record (DS4P pattern).
PART2_LABELS: list[dict[str, Any]] = [
    {
        "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
        "code": "R",
        "display": "restricted",
        "extension": [
            {
                "url": "http://hl7.org/fhir/uv/security-label-ds4p/StructureDefinition/extension-sec-label-basis",
                "valueCoding": {"system": ACT_CODE, "code": "42CFRPart2", "display": "42 CFR Part2"},
            }
        ],
    },
    {"system": ACT_CODE, "code": "42CFRPart2", "display": "42 CFR Part2"},
    {"system": ACT_CODE, "code": "SUD", "display": "substance use disorder information sensitivity"},
    {"system": ACT_CODE, "code": "NORDSCLCD", "display": "no redisclosure without consent directive"},
    {"system": ACT_CODE, "code": "CPLYCD", "display": "comply with consent directive"},
]
_PART2_LABELS_JSON = orjson.dumps(PART2_LABELS)
# Types that have no identifier element; every other produced type carries the record identifier.
NO_IDENTIFIER = {"Provenance"}
_FIELD_RE = re.compile(r"\{([A-Za-z0-9_.\[\]]+)\}")
CONTEXT = "context"  # the name templates read the mapping context by ("$context.gender")


@dataclass
class Produced:
    role: str
    resource: dict[str, Any]
    shared: bool = False

    @property
    def reference(self) -> str:
        return f"{self.resource['resourceType']}/{self.resource['id']}"


@dataclass
class Overlay:
    """A change this record makes to a resource of another record (see UpdateSpec)."""

    record_kind: str
    role: str
    key: str | None
    merge: dict[str, Any]
    key_path: str | None = None  # the JSON path of the field the key came from, for errors


@dataclass
class Member:
    """One of the records an expanding record stands for (an attendee's session of a group session)."""

    index: int
    key: str
    record: dict[str, Any]
    path: str  # the JSON path of the element it was built from ("attendees[2]")
    key_path: str  # the JSON path of its key ("attendees[2].enrollment_id")
    paths: dict[str, str]  # each of its fields -> the JSON path in the expanding record the value came from

    def issue(self, issue: Issue) -> Issue:
        """An issue about the member's record, as an issue about the expanding record (its path rewritten)."""
        if not issue.expression:
            return issue
        head = re.split(r"[.\[]", issue.expression, maxsplit=1)[0]
        base = self.paths.get(head)
        where = base + issue.expression[len(head) :] if base is not None else _join(self.path, issue.expression)
        return Issue(issue.code, issue.diagnostics, where, issue.severity)


@dataclass
class _Scope:
    record: Mapping[str, Any]
    vars: dict[str, tuple[Any, str]] = field(default_factory=dict)

    def bind(self, name: str, value: Any, path: str) -> _Scope:
        return _Scope(self.record, {**self.vars, name: (value, path)})


def _segments(path: str) -> list[str]:
    return path.split(".")


def _join(base: str, name: str) -> str:
    return f"{base}.{name}" if base else name


class Engine:
    """Maps records of every kind with the specs and terminology it was built with. Pure: no I/O after loading."""

    def __init__(
        self,
        specs: Mapping[str, MappingSpec],
        terminology: Terminology,
        functions: Mapping[str, Callable[..., Any]] | None = None,
    ) -> None:
        from iop_fhir.mapping import functions as builtin

        self.specs = dict(specs)
        self.terminology = terminology
        self.functions = dict(builtin.FUNCTIONS)
        self.functions.update(functions or {})
        self._code_reverse: dict[str, dict[str, str]] = {}
        self._tables: dict[str, Any] = {}
        self._current: tuple[str, str] = ("", "")
        self._resolve: Callable[[str], dict[str, Any] | None] = lambda _ref: None

    def spec(self, kind: str) -> MappingSpec:
        try:
            return self.specs[kind]
        except KeyError:
            raise KeyError(f"no mapping for record kind '{kind}'") from None

    # -- expressions -------------------------------------------------------------------------------------------

    def _lookup(self, expr: str, scope: _Scope) -> tuple[Any, str]:
        parts = _segments(expr[1:])
        if parts[0] in scope.vars:
            value, path = scope.vars[parts[0]]
            parts = parts[1:]
        else:
            value, path = scope.record, ""
        for part in parts:
            if isinstance(value, Mapping) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
                path = f"{path}[{part}]"
                continue
            else:
                return MISSING, _join(path, part)
            path = _join(path, part)
        return (MISSING if value is None else value), path

    def value(self, expr: Any, scope: _Scope, issues: list[Issue]) -> Any:
        """Evaluates a template or expression; MISSING when there is nothing to emit."""
        if isinstance(expr, str):
            if expr.startswith("$$"):
                return expr[1:]
            if expr.startswith("$"):
                return self._lookup(expr, scope)[0]
            return expr
        if isinstance(expr, list):
            out: list[Any] = []
            for item in expr:
                if isinstance(item, dict) and "$each" in item:
                    out.extend(self._each(item, scope, issues))
                    continue
                result = self.value(item, scope, issues)
                if result is not MISSING:
                    out.append(result)
            return out or MISSING
        if isinstance(expr, dict):
            op = next((k for k in expr if k.startswith("$")), None)
            if op is not None:
                return self._operator(op, expr, scope, issues)
            obj = {}
            for key, sub in expr.items():
                result = self.value(sub, scope, issues)
                if result is not MISSING:
                    obj[key] = result
            return obj or MISSING
        return expr

    def _each(self, expr: dict[str, Any], scope: _Scope, issues: list[Issue]) -> list[Any]:
        items, path = self._lookup(expr["$each"], scope)
        if items is MISSING:
            return []
        name = expr.get("as", "item")
        out = []
        for n, item in enumerate(items):
            inner = scope.bind(name, item, f"{path}[{n}]").bind(f"{name}_index", n, "")
            result = self.value(expr["do"], inner, issues)
            if result is not MISSING:
                out.append(result)
        return out

    def _operator(self, op: str, expr: dict[str, Any], scope: _Scope, issues: list[Issue]) -> Any:
        if op == "$code":
            return self._code(expr, scope, issues)
        if op == "$if":
            test = self.value(expr["$if"], scope, issues)
            ok = test is not MISSING and test is not False and test != []
            if "is" in expr:
                ok = test == expr["is"]
            if "in" in expr:
                ok = test in expr["in"]
            branch = expr.get("then") if ok else expr.get("else")
            return MISSING if branch is None else self.value(branch, scope, issues)
        if op == "$lookup":
            table = self._tables.get(expr["$lookup"], {})
            key = self.value(expr["key"], scope, issues)
            entry = table.get(key) if key is not MISSING else None
            if entry is None:
                return MISSING
            if "get" in expr:  # (a deep copy of MISSING would not be MISSING)
                found = entry.get(expr["get"]) if isinstance(entry, dict) else None
                return MISSING if found is None else copy.deepcopy(found)
            return copy.deepcopy(entry)
        if op == "$fn":
            args = [self.value(a, scope, issues) for a in expr.get("args", [])]
            if any(a is MISSING for a in args) and not expr.get("partial"):
                return MISSING
            result = self.functions[expr["$fn"]](*[None if a is MISSING else a for a in args])
            return MISSING if result is None else result
        if op == "$text":
            return self._text(expr["$text"], scope)
        if op == "$ref":
            target = self._ref_target(expr, scope, issues)
            if target is None:
                return MISSING
            ref: dict[str, Any] = {"reference": target}
            if "display" in expr:
                display = self.value(expr["display"], scope, issues)
                if display is not MISSING:
                    ref["display"] = display
            return ref
        if op == "$each":
            return self._each(expr, scope, issues) or MISSING
        raise ValueError(f"unknown template operator {op}")

    def _text(self, template: str, scope: _Scope) -> Any:
        missing = False

        def sub(match: re.Match[str]) -> str:
            nonlocal missing
            value = self._lookup("$" + match.group(1), scope)[0]
            if value is MISSING:
                missing = True
                return ""
            return str(value)

        text = _FIELD_RE.sub(sub, template)
        return MISSING if missing and not text.strip() else text

    def _code(self, expr: dict[str, Any], scope: _Scope, issues: list[Issue]) -> Any:
        vocabulary = expr["$code"]
        source = expr["from"]
        if isinstance(source, str) and source.startswith("$"):
            code, path = self._lookup(source, scope)
        else:
            code, path = self.value(source, scope, issues), ""
        if code is MISSING:
            return MISSING
        depends = {}
        for prop, dep in (expr.get("depends") or {}).items():
            dep_value = self.value(dep, scope, issues)
            if dep_value is not MISSING:
                depends[prop] = str(dep_value)
        codings = self.terminology.translate(vocabulary, str(code), depends or None)
        if not codings:
            allowed = self.terminology.codes(vocabulary)
            if str(code) not in allowed:
                issues.append(
                    Issue("code-invalid", f"unknown value '{code}'; allowed: {', '.join(allowed)}", path or None)
                )
            else:
                qualifier = "".join(f" with {k} '{v}'" for k, v in depends.items())
                issues.append(
                    Issue(
                        "code-invalid",
                        f"no map covers code '{code}'{qualifier} (ConceptMap iop-{vocabulary})",
                        path or None,
                    )
                )
            return MISSING
        shape = expr.get("as", "concept")
        if shape == "code":
            return codings[0]["code"]
        if shape == "display":
            return codings[0].get("display", MISSING)
        if shape == "coding":
            return dict(codings[0])
        if shape == "codings":
            return [dict(c) for c in codings]
        concept: dict[str, Any] = {"coding": [dict(c) for c in codings]}
        if "text" in expr:
            text = self.value(expr["text"], scope, issues)
            if text is not MISSING:
                concept["text"] = text
        return concept

    def _ref_target(self, expr: dict[str, Any], scope: _Scope, issues: list[Issue]) -> str | None:
        role = expr["$ref"]
        if "shared" in expr:
            values = [self.value(v, scope, issues) for v in expr["shared"]]
            if any(v is MISSING for v in values):
                return None
            return f"{expr['type']}/{ids.shared_id(expr['type'], role, [str(v) for v in values])}"
        if "id" in expr:  # a resource whose id is a record field (a partner's Organization)
            res_id = self.value(expr["id"], scope, issues)
            return None if res_id is MISSING else f"{expr['type']}/{res_id}"
        key = None
        if "key" in expr:
            key_value = self.value(expr["key"], scope, issues)
            if key_value is MISSING:
                return None
            key = str(key_value)
        record = expr.get("record")
        if record is not None:
            kind = record["kind"]
            rid = self.value(record["id"], scope, issues)
            if rid is MISSING:
                return None
        else:
            kind, rid = self._current
        spec = self.spec(kind).resource(role)
        return f"{spec.type}/{ids.resource_id(kind, str(rid), role, key)}"

    # -- records -> resources ---------------------------------------------------------------------------------

    def natural_key(self, kind: str, record: Mapping[str, Any]) -> str:
        spec = self.spec(kind)
        scope = _Scope(record)
        if spec.id is not None:
            return str(self.value(spec.id, scope, []))
        values = []
        for part in spec.key:
            value = self.value(part, scope, [])
            values.append("" if value is MISSING else str(value))
        return ids.record_id(kind, values)

    def check_codes(self, kind: str, record: Mapping[str, Any]) -> list[Issue]:
        """Every coded field must hold a code of its vocabulary; the error lists the allowed ones."""
        issues: list[Issue] = []
        for path, vocabulary in self.spec(kind).codes.items():
            allowed = self.terminology.codes(vocabulary)
            for value, where in _walk(record, path):
                if not isinstance(value, str) or value not in allowed:
                    issues.append(
                        Issue("code-invalid", f"unknown value '{value}'; allowed: {', '.join(allowed)}", where)
                    )
        return issues

    def prepare(self, kind: str, payload: Mapping[str, Any], context: Mapping[str, Any]) -> rules.Derived:
        """The record as stored: codes checked, derived values added (computed totals, weekly hours), warnings."""
        spec = self.spec(kind)
        if spec.expand is not None:
            return self._prepare_members(kind, payload, context)
        issues = self.check_codes(kind, payload)
        if issues:  # the rules read coded fields (period units, instruments), so they run on known codes only
            raise Invalid(_unique(issues))
        derived = rules.apply(spec.derive, payload, spec.tables, context)
        if derived.errors:
            raise Invalid(_unique(derived.errors))
        return derived

    def map(
        self, kind: str, record: Mapping[str, Any], rid: str, context: Mapping[str, Any] | None = None
    ) -> list[Produced]:
        """The record's own resources, in template order; raises Invalid naming every uncovered code. ``context`` is
        what templates read as ``$context`` (the service's context of the record, see `prepare`)."""
        spec = self.spec(kind)
        issues: list[Issue] = []
        produced: list[Produced] = []
        if spec.expand is not None:
            produced = self._map_members(kind, record, rid, context or {}, issues)
        self._tables = spec.tables
        self._current = (kind, rid)
        root = _Scope(record) if context is None else _Scope(record).bind(CONTEXT, context, CONTEXT)
        for res_spec in spec.resources:
            for scope, key in self._instances(res_spec.each, res_spec.as_, res_spec.key, root, issues):
                if res_spec.when is not None and not _truthy(self.value(res_spec.when, scope, issues)):
                    continue
                body = self.value(res_spec.template, scope, issues)
                if body is MISSING:
                    body = {}
                produced.append(self._finish(spec, res_spec, body, scope, key, rid, issues))
        if issues:
            raise Invalid(_unique(issues))
        return produced

    def _instances(
        self, each: str | None, name: str, key_expr: Any, scope: _Scope, issues: list[Issue]
    ) -> Iterable[tuple[_Scope, str | None]]:
        if each is None:
            yield scope, None
            return
        if "[]." in each:  # "$outer[].inner": one instance per element of each outer element's list
            outer_path, inner_field = each.split("[].", 1)
            outer_name, _, name = name.partition(",")
            outers, path = self._lookup(outer_path, scope)
            if outers is MISSING:
                return
            for n, outer in enumerate(outers):
                outer_scope = scope.bind(outer_name, outer, f"{path}[{n}]")
                items, inner_path = self._lookup(f"${outer_name}.{inner_field}", outer_scope)
                if items is MISSING:
                    continue
                for i, item in enumerate(items):
                    inner = outer_scope.bind(name, item, f"{inner_path}[{i}]").bind(f"{name}_index", i, "")
                    key = f"{n}.{i}" if key_expr is None else str(self.value(key_expr, inner, issues))
                    yield inner, key
            return
        items, path = self._lookup(each, scope)
        if items is MISSING:
            return
        for n, item in enumerate(items):
            inner = scope.bind(name, item, f"{path}[{n}]").bind(f"{name}_index", n, "")
            key = str(n) if key_expr is None else str(self.value(key_expr, inner, issues))
            yield inner, key

    def _finish(
        self,
        spec: MappingSpec,
        res_spec: ResourceSpec,
        body: dict[str, Any],
        scope: _Scope,
        key: str | None,
        rid: str,
        issues: list[Issue],
    ) -> Produced:
        shared = res_spec.shared is not None
        if shared:
            values = [self.value(v, scope, issues) for v in res_spec.shared or []]
            res_id = ids.shared_id(res_spec.type, res_spec.role, [str(v) for v in values])
        elif res_spec.id is not None:
            res_id = str(self.value(res_spec.id, scope, issues))
        else:
            res_id = ids.resource_id(spec.kind, rid, res_spec.role, key)
        resource: dict[str, Any] = {
            "resourceType": res_spec.type,
            "id": res_id,
            "meta": {"profile": _claimed_profiles(res_spec), "security": orjson.loads(_PART2_LABELS_JSON)},
        }
        if not shared and res_spec.type not in NO_IDENTIFIER:
            record_identifier = {
                "system": ids.RECORD_SYSTEM,
                "value": ids.identifier_value(spec.kind, rid, res_spec.role, key),
            }
            resource["identifier"] = [*body.pop("identifier", []), record_identifier]
        resource.update(body)
        return Produced(res_spec.role, resource, shared)

    def overlays(self, kind: str, record: Mapping[str, Any], rid: str) -> list[Overlay]:
        spec = self.spec(kind)
        self._tables = spec.tables
        self._current = (kind, rid)
        issues: list[Issue] = []
        out = []
        for update in spec.updates:
            for scope, key in self._instances(update.each, update.as_, update.key, _Scope(record), issues):
                if update.when is not None and not _truthy(self.value(update.when, scope, issues)):
                    continue
                merge = self.value(update.merge, scope, issues)
                key_path = self._lookup(update.key, scope)[1] if isinstance(update.key, str) else None
                out.append(Overlay(update.record, update.role, key, {} if merge is MISSING else merge, key_path))
        if issues:
            raise Invalid(_unique(issues))
        return out

    def retracted(self, kind: str, role: str, resource: dict[str, Any]) -> dict[str, Any]:
        """The resource marked entered-in-error, as the role's `retract` section says."""
        res_spec = self.resource_spec(kind, role)
        return {**resource, **copy.deepcopy(res_spec.retract or {})}

    def resource_spec(self, kind: str, role: str) -> ResourceSpec:
        """The spec of a role of the record's resources: its own, or one of the kind its members are mapped with."""
        spec = self.spec(kind)
        try:
            return spec.resource(role)
        except KeyError:
            if spec.expand is None:
                raise
            return self.spec(spec.expand.kind).resource(role)

    # -- records that stand for several records (a group session: one session per attendee) ------------------

    def members(self, kind: str, record: Mapping[str, Any]) -> list[Member]:
        """The member records of an expanding record, in list order, each built from its `expand.record` (sharing
        the record's values: mapping reads a record and never changes it, and `prepare` copies what it derives)."""
        expand = self.spec(kind).expand
        if expand is None:
            return []
        items, path = self._lookup(expand.each, _Scope(record))
        out = []
        for n, item in enumerate(items if isinstance(items, list) else []):
            scope = _Scope(record).bind(expand.as_, item, f"{path}[{n}]")
            member: dict[str, Any] = {}
            paths: dict[str, str] = {}
            for name, expr in expand.record.items():
                value, where = self._lookup(expr, scope)
                paths[name] = where
                if value is not MISSING:
                    member[name] = value
            key, key_path = self._lookup(expand.key, scope)
            out.append(Member(n, str(key), member, f"{path}[{n}]", key_path, paths))
        return out

    def member_id(self, kind: str, rid: str, member: Member) -> str:
        """The record id a member's resources are named by: stable for the record and the member's key, so that a
        correction of the record updates the same resources, and opaque (it names neither of them)."""
        return ids.record_id(kind, [rid, member.key])

    def _prepare_members(self, kind: str, payload: Mapping[str, Any], context: Mapping[str, Any]) -> rules.Derived:
        """Each member prepared as a record of its own kind, with the context the service gathered for it
        (context["members"][i]); what that adds to a member (a drug screen result a medication explains) is written
        back to the fields it came from, so that the record maps to what each member's own record would."""
        expand = self.spec(kind).expand
        assert expand is not None
        contexts = context.get("members") or []
        derived = rules.Derived(copy.deepcopy(dict(payload)))
        elements = self._lookup(expand.each, _Scope(derived.record))[0]
        for member in self.members(kind, payload):
            member_context = contexts[member.index] if member.index < len(contexts) else {}
            try:
                prepared = self.prepare(expand.kind, member.record, member_context)
            except Invalid as error:
                derived.errors.extend(member.issue(i) for i in error.issues)
                continue
            derived.warnings.extend(member.issue(w) for w in prepared.warnings)
            if prepared.record != member.record:
                scope = _Scope(derived.record).bind(expand.as_, elements[member.index], member.path)
                self._unify(expand.record, prepared.record, scope)
        if derived.errors:
            raise Invalid(_unique(derived.errors))
        return derived

    def _map_members(
        self, kind: str, record: Mapping[str, Any], rid: str, context: Mapping[str, Any], issues: list[Issue]
    ) -> list[Produced]:
        """Each member's resources, as its own kind's mapping makes them with the member's context
        (context["members"][i]), with the `add` of their roles merged in; a shared resource (the facilitator) once."""
        expand = self.spec(kind).expand
        assert expand is not None
        produced: list[Produced] = []
        seen: set[str] = set()
        items, _path = self._lookup(expand.each, _Scope(record))
        contexts = context.get("members") or []
        for member in self.members(kind, record):
            member_context = contexts[member.index] if member.index < len(contexts) else None
            try:
                resources = self.map(expand.kind, member.record, self.member_id(kind, rid, member), member_context)
            except Invalid as error:
                issues.extend(member.issue(i) for i in error.issues)
                continue
            self._tables = self.spec(kind).tables
            scope = _Scope(record).bind(expand.as_, items[member.index], member.path)
            for item in resources:
                if item.shared and item.reference in seen:
                    continue
                seen.add(item.reference)
                add = expand.add.get(item.role)
                if add is not None:
                    fragment = self.value(add, scope, issues)
                    if fragment is not MISSING:  # the resource was just made: merged in place, copying what changes
                        touched = {k: item.resource[k] for k in fragment if k in item.resource}
                        item.resource.update(merge(touched, fragment))
                produced.append(item)
        return produced

    def _reverse_members(self, kind: str, by_role: dict[str, list[dict[str, Any]]], record: dict[str, Any]) -> None:
        """Rebuilds the members from their resources (grouped by the member record they name) and the expanding
        record from the members."""
        expand = self.spec(kind).expand
        assert expand is not None
        member_kind = self.spec(expand.kind)
        groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        shared: list[tuple[str, dict[str, Any]]] = []
        for res_spec in member_kind.resources:
            for resource in by_role.get(res_spec.role, []):
                if res_spec.shared is not None:
                    shared.append((res_spec.role, resource))
                    continue
                own = [i for i in resource.get("identifier", []) if i.get("system") == ids.RECORD_SYSTEM]
                parsed = ids.parse_identifier_value(own[0].get("value", "")) if own else None
                if parsed is not None and parsed[0] == expand.kind:
                    groups.setdefault(parsed[1], []).append((res_spec.role, resource))
        # Every member has resources of the first unshared role (an attendee's Encounter), in the list's order.
        items: list[dict[str, Any]] = []
        for resources in groups.values():
            member = self.reverse(expand.kind, [*shared, *resources], self._resolve)
            item: dict[str, Any] = {}
            scope = _Scope(record).bind(expand.as_, item, "")
            self._unify(expand.record, member, scope)
            for role, add in expand.add.items():
                for role_of, resource in resources:
                    if role_of == role:
                        self._unify(add, resource, scope)
            items.append(item)
        if items:
            self._set(expand.each, _Scope(record), items)

    # -- resources -> records ---------------------------------------------------------------------------------

    def reverse(
        self,
        kind: str,
        produced: Iterable[tuple[str, dict[str, Any]]],
        resolve: Callable[[str], dict[str, Any] | None] = lambda _ref: None,
    ) -> dict[str, Any]:
        """Rebuilds the record from its resources (role, resource), in the order `map` produced them. `resolve`
        reads a referenced resource (to recover the enrollment a session belongs to, say)."""
        spec = self.spec(kind)
        self._tables = spec.tables
        self._resolve = resolve
        by_role: dict[str, list[dict[str, Any]]] = {}
        for role, resource in produced:
            by_role.setdefault(role, []).append(resource)
        record: dict[str, Any] = {}
        if spec.expand is not None:
            self._reverse_members(kind, by_role, record)
            self._tables = spec.tables
        for res_spec in spec.resources:
            if res_spec.each is not None and "[]." in res_spec.each:
                self._reverse_nested(res_spec, by_role.get(res_spec.role, []), record)
                continue
            for n, resource in enumerate(by_role.get(res_spec.role, [])):
                scope = _Scope(record)
                item: dict[str, Any] = {}
                if res_spec.each is not None:
                    existing = self._lookup(res_spec.each, scope)[0]
                    if res_spec.when is not None:  # made for some elements only: its key names its element
                        n = self._element_index(res_spec, record, existing, resource, n)
                    if isinstance(existing, list) and n < len(existing) and isinstance(existing[n], dict):
                        item = existing[n]
                    _assign(record, res_spec.each[1:], item, index=n)
                    scope = scope.bind(res_spec.as_, item, "")
                body = {k: v for k, v in resource.items() if k not in ("resourceType", "id", "meta")}
                if "identifier" in body and res_spec.shared is None:
                    own = [i for i in body["identifier"] if i.get("system") == ids.RECORD_SYSTEM]
                    parsed = ids.parse_identifier_value(own[0].get("value", "")) if own else None
                    if parsed and parsed[3] is not None and isinstance(res_spec.key, str):
                        self._set(res_spec.key, scope, parsed[3])
                    body["identifier"] = [i for i in body["identifier"] if i.get("system") != ids.RECORD_SYSTEM]
                    if not body["identifier"]:
                        del body["identifier"]
                self._unify(res_spec.template, body, scope)
                if "$value" in item and res_spec.each is not None:
                    _assign(record, res_spec.each[1:], item.pop("$value"), index=n)
        for update in spec.updates:
            for n, resource in enumerate(by_role.get(f"{update.record}:{update.role}", [])):
                scope = _Scope(record)
                if update.each is not None:
                    item = {}
                    _assign(record, update.each[1:], item, index=n)
                    scope = scope.bind(update.as_, item, "")
                    own = [i for i in resource.get("identifier", []) if i.get("system") == ids.RECORD_SYSTEM]
                    parsed = ids.parse_identifier_value(own[0].get("value", "")) if own else None
                    if parsed and parsed[3] is not None and isinstance(update.key, str):
                        self._set(update.key, scope, parsed[3])
                self._unify(update.merge, resource, scope)
        return record

    def _reverse_nested(self, res_spec: ResourceSpec, resources: list[dict[str, Any]], record: dict[str, Any]) -> None:
        """Resources made per element of nested lists ("$outer[].inner") fill, in order, the inner lists that an
        earlier role rebuilt (a panel's hasMember gives the number of items of each instrument)."""
        outer_path, inner_field = (res_spec.each or "").split("[].", 1)
        outer_name, _, name = res_spec.as_.partition(",")
        outers = self._lookup(outer_path, _Scope(record))[0]
        slots: list[tuple[dict[str, Any], int]] = []
        for outer in outers if isinstance(outers, list) else []:
            inner = outer.get(inner_field) if isinstance(outer, dict) else None
            slots.extend((outer, i) for i in range(len(inner) if isinstance(inner, list) else 0))
        for (outer, i), resource in zip(slots, resources, strict=False):
            item: dict[str, Any] = outer[inner_field][i] if isinstance(outer[inner_field][i], dict) else {}
            scope = _Scope(record).bind(outer_name, outer, "").bind(name, item, "")
            body = {k: v for k, v in resource.items() if k not in ("resourceType", "id", "meta", "identifier")}
            self._unify(res_spec.template, body, scope)
            outer[inner_field][i] = item.pop("$value") if "$value" in item else item

    def _element_index(
        self, res_spec: ResourceSpec, record: dict[str, Any], elements: Any, resource: dict[str, Any], default: int
    ) -> int:
        """The index of the list element a resource was made for, by the key of its record identifier."""
        own = [i for i in resource.get("identifier", []) if i.get("system") == ids.RECORD_SYSTEM]
        parsed = ids.parse_identifier_value(own[0].get("value", "")) if own else None
        if parsed is None or parsed[3] is None or not isinstance(elements, list):
            return default
        for index, element in enumerate(elements):
            scope = _Scope(record).bind(res_spec.as_, element, "").bind(f"{res_spec.as_}_index", index, "")
            if str(self.value(res_spec.key, scope, [])) == parsed[3]:
                return index
        return default

    def _set(self, expr: str, scope: _Scope, value: Any) -> None:
        parts = _segments(expr[1:])
        if parts[0] == CONTEXT and CONTEXT not in scope.vars:  # the mapping context is not part of the record
            return
        if parts[0] in scope.vars:
            target = scope.vars[parts[0]][0]
            parts = parts[1:]
        else:
            target = scope.record
        if not isinstance(target, dict):
            return
        if not parts:  # the loop variable itself is the value (a list of strings or numbers)
            target["$value"] = value
            return
        _assign(target, ".".join(parts), value)

    def _matches(self, template: Any, value: Any) -> bool:
        """Whether the fixed parts of a template agree with a value (used to pick list items apart)."""
        if isinstance(template, str):
            return template.startswith("$") or template == value
        if isinstance(template, dict):
            op = next((k for k in template if k.startswith("$")), None)
            if op == "$code":
                code = self._code_reverse_value(template, value)
                source = template["from"]
                if isinstance(source, str) and not source.startswith("$"):
                    return code == source
                return code is not None
            if op == "$if":
                return any(self._matches(template[b], value) for b in ("then", "else") if template.get(b) is not None)
            if op == "$lookup":
                return self._lookup_reverse(template, value) is not None
            if op == "$ref":
                return self._ref_matches(template, value)
            if op is not None:
                return True
            if not isinstance(value, dict):
                return False
            for key, sub in template.items():
                if key in value:
                    if not self._matches(sub, value[key]):
                        return False
                elif _fixed(sub):
                    return False
            return True
        if isinstance(template, list):
            if not isinstance(value, list):
                return False
            if any(isinstance(t, dict) and "$each" in t for t in template):
                return True
            return all(n < len(value) and self._matches(t, value[n]) for n, t in enumerate(template) if _fixed(t))
        return bool(template == value)

    def _unify(self, template: Any, value: Any, scope: _Scope) -> None:
        if value is None:
            return
        if isinstance(template, str):
            if template.startswith("$") and not template.startswith("$$"):
                self._set(template, scope, copy.deepcopy(value))
            return
        if isinstance(template, list):
            self._unify_list(template, value if isinstance(value, list) else [value], scope)
            return
        if not isinstance(template, dict):
            return
        op = next((k for k in template if k.startswith("$")), None)
        if op is None:
            if isinstance(value, dict):
                for key, sub in template.items():
                    if key in value:
                        self._unify(sub, value[key], scope)
            return
        if op == "$code":
            code = self._code_reverse_value(template, value)
            source = template["from"]
            if code is not None and isinstance(source, str) and source.startswith("$"):
                self._set(source, scope, code)
            text = template.get("text")
            if isinstance(text, str) and text.startswith("$") and isinstance(value, dict) and "text" in value:
                self._set(text, scope, value["text"])
        elif op == "$if":
            then, other = template.get("then"), template.get("else")
            test = template["$if"]
            if then is not None and self._matches(then, value):
                if isinstance(test, str) and test.startswith("$") and "is" in template:
                    self._set(test, scope, template["is"])
                self._unify(then, value, scope)
            elif other is not None:
                self._unify(other, value, scope)
        elif op == "$lookup":
            key = self._lookup_reverse(template, value)
            source = template["key"]
            if key is not None and isinstance(source, str) and source.startswith("$"):
                self._set(source, scope, key)
        elif op == "$ref":
            self._unify_ref(template, value, scope)
        elif op == "$fn":
            inverse = self.functions.get(template["$fn"] + ":inverse")
            args = template.get("args", [])
            if inverse is not None and args and isinstance(args[0], str) and args[0].startswith("$"):
                self._set(args[0], scope, inverse(value))
        elif op == "$each":
            self._unify_list([template], value if isinstance(value, list) else [value], scope)

    def _unify_list(self, templates: list[Any], values: list[Any], scope: _Scope) -> None:
        pos = 0
        for template in templates:
            if isinstance(template, dict) and "$each" in template:
                name = template.get("as", "item")
                items: list[Any] = []
                source = template["$each"]
                current = self._lookup(source, scope)[0]
                existing = current if isinstance(current, list) else []
                while pos < len(values) and self._matches(template["do"], values[pos]):
                    n = len(items)
                    # another resource may already have rebuilt part of this list item: fill it in
                    item: dict[str, Any] = existing[n] if n < len(existing) and isinstance(existing[n], dict) else {}
                    self._unify(template["do"], values[pos], scope.bind(name, item, ""))
                    items.append(item.pop("$value") if "$value" in item else item)
                    pos += 1
                if items:
                    self._set(source, scope, items)
                continue
            for j in range(pos, len(values)):
                if self._matches(template, values[j]):
                    self._unify(template, values[j], scope)
                    pos = j + 1
                    break

    def _unify_ref(self, template: dict[str, Any], value: Any, scope: _Scope) -> None:
        if not isinstance(value, dict) or "reference" not in value:
            return
        if "id" in template and isinstance(template["id"], str):
            self._set(template["id"], scope, value["reference"].split("/", 1)[1])
            return
        record = template.get("record")
        key = template.get("key")
        if record is None and isinstance(key, str) and key.startswith("$") and not key.endswith("_index"):
            target = self._resolve(value["reference"])
            for identifier in (target or {}).get("identifier", []):
                if identifier.get("system") == ids.RECORD_SYSTEM:
                    parsed = ids.parse_identifier_value(identifier.get("value", ""))
                    if parsed and parsed[3] is not None:
                        self._set(key, scope, parsed[3])
            return
        if record is None or not isinstance(record.get("id"), str):
            return
        target = self._resolve(value["reference"])
        if target is None:
            return
        for identifier in target.get("identifier", []):
            if identifier.get("system") == ids.RECORD_SYSTEM:
                parsed = ids.parse_identifier_value(identifier.get("value", ""))
                if parsed and parsed[0] == record["kind"]:
                    self._set(record["id"], scope, parsed[1])
                    return

    def _ref_matches(self, template: dict[str, Any], value: Any) -> bool:
        """A reference matches a $ref template when it points at a resource of that role (when that can be told)."""
        if not isinstance(value, dict) or not isinstance(value.get("reference"), str):
            return False
        if "shared" in template or "id" in template:
            return bool(value["reference"].startswith(f"{template['type']}/"))
        target = self._resolve(value["reference"])
        if target is None:
            return True
        for identifier in target.get("identifier", []):
            if identifier.get("system") == ids.RECORD_SYSTEM:
                parsed = ids.parse_identifier_value(identifier.get("value", ""))
                return parsed is not None and parsed[2] == template["$ref"]
        return True

    def _code_reverse_value(self, template: dict[str, Any], value: Any) -> str | None:
        vocabulary = template["$code"]
        shape = template.get("as", "concept")
        if shape == "code":
            if vocabulary not in self._code_reverse:
                table: dict[str, str] = {}
                for code in self.terminology.codes(vocabulary):
                    codings = self.terminology.translate(vocabulary, code)
                    if codings:
                        table.setdefault(codings[0]["code"], code)
                self._code_reverse[vocabulary] = table
            return self._code_reverse[vocabulary].get(value) if isinstance(value, str) else None
        if shape == "display":
            for code in self.terminology.codes(vocabulary):
                codings = self.terminology.translate(vocabulary, code)
                if codings and codings[0].get("display") == value:
                    return code
            return None
        if shape == "coding":
            codings = [value]
        elif shape == "codings":
            codings = value if isinstance(value, list) else [value]
        else:
            codings = value.get("coding", []) if isinstance(value, dict) else []
        if not all(isinstance(c, dict) for c in codings):
            return None
        return self.terminology.reverse(vocabulary, codings)

    def _lookup_reverse(self, template: dict[str, Any], value: Any) -> str | None:
        table = self._tables.get(template["$lookup"], {})
        for key, entry in table.items():
            got = entry.get(template["get"]) if "get" in template and isinstance(entry, dict) else entry
            if got == value or (isinstance(got, dict) and isinstance(value, dict) and _subset(got, value)):
                return str(key)
        return None


# -- helpers -------------------------------------------------------------------------------------------------


def _truthy(value: Any) -> bool:
    return value is not MISSING and value is not False and value != [] and value is not None


def _fixed(template: Any) -> bool:
    """Whether a template always yields a value (a literal somewhere that must then be present)."""
    if isinstance(template, str):
        return not template.startswith("$")
    if isinstance(template, dict):
        if any(k.startswith("$") for k in template):
            return False
        return any(_fixed(v) for v in template.values())
    if isinstance(template, list):
        return any(_fixed(v) for v in template)
    return True


def _subset(small: Any, big: Any) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and _subset(v, big[k]) for k, v in small.items())
    return bool(small == big)


def _assign(target: dict[str, Any], path: str, value: Any, *, index: int | None = None) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    last = parts[-1]
    if index is None:
        target[last] = value
        return
    items = target.setdefault(last, [])
    while len(items) <= index:
        items.append({})
    items[index] = value


def _walk(record: Any, path: str, where: str = "") -> Iterable[tuple[Any, str]]:
    """The values at a path like `drug_screen.results[].analyte`, with their concrete JSON paths."""
    head, _, rest = path.partition(".")
    many = head.endswith("[]")
    name = head[:-2] if many else head
    if not isinstance(record, Mapping) or record.get(name) is None:
        return
    value = record[name]
    here = _join(where, name)
    if many:
        if not isinstance(value, list):
            return
        for n, item in enumerate(value):
            if rest:
                yield from _walk(item, rest, f"{here}[{n}]")
            else:
                yield item, f"{here}[{n}]"
    elif rest:
        yield from _walk(value, rest, here)
    else:
        yield value, here


def _claimed_profiles(res_spec: ResourceSpec) -> list[str]:
    """meta.profile: the project profile, and the US Core profile it derives from, which partners that know US Core
    but cannot resolve the project's canonical URLs recognise (and search by, with _profile)."""
    claimed = [PROFILE_BASE + res_spec.profile]
    return claimed + [US_CORE_BASE + res_spec.us_core] if res_spec.us_core else claimed


def _unique(issues: list[Issue]) -> list[Issue]:
    seen: dict[tuple[str | None, str], Issue] = {}
    for issue in issues:
        seen.setdefault((issue.expression, issue.diagnostics), issue)
    return list(seen.values())


def merge(resource: dict[str, Any], fragment: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the resource with the fragment merged in: objects merge, lists append (an extension with the same
    url is replaced), other values are replaced, and so is a CodeableConcept (a discharge's clinical status is not
    one more coding of the admission's)."""
    out = copy.deepcopy(resource)
    for key, value in fragment.items():
        current = out.get(key)
        if isinstance(current, dict) and isinstance(value, dict) and "coding" not in value:
            out[key] = merge(current, value)
        elif isinstance(current, list) and isinstance(value, list):
            urls = {v.get("url") for v in value if isinstance(v, dict) and "url" in v}
            kept = [c for c in current if not (isinstance(c, dict) and c.get("url") in urls)]
            out[key] = kept + copy.deepcopy(value)
        else:
            out[key] = copy.deepcopy(value)
    return out
