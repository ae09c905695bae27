"""SMART v2 scopes: parsing a token's scope string and deciding which FHIR interactions it permits (pure).

https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from iop_fhir.r4 import definitions

CONTEXTS = ("system", "user", "patient")
PERMISSIONS = "cruds"
# SMART v1 suffixes and the v2 permissions each stands for ("Scope equivalence" in the SMART guide).
V1_PERMISSIONS = {"read": "rs", "write": "cud", "*": "cruds"}
# Scopes SMART defines that name no resources. Kept as written; they grant no access to data.
NON_RESOURCE_SCOPES = frozenset(
    {"openid", "fhirUser", "profile", "launch", "launch/patient", "launch/encounter", "offline_access", "online_access"}
)
# Only system/ scopes grant access here: the service authenticates clients (SMART Backend Services), so there is no
# user or patient in context to narrow user/ and patient/ scopes to. Those are parsed and kept, and grant nothing.
GRANTING_CONTEXTS = frozenset({"system"})

# What each interaction needs, after the permission table of SMART v2 ("c r u d s"):
#   read, vread, history-instance             r  (instance level reads)
#   search, search-type, search-system,       s  (type and system level search and history; a system-level request
#   history-type, history-system                   is checked once per resource type it returns)
#   create                                    c
#   update, patch                             u  (SMART lets the update scope cover an update that creates)
#   delete                                    d
# SMART says nothing of conditional interactions. Each one runs a search on the client's criteria and its answer
# (created, updated, 412 on several matches, ...) tells whether records match, so it needs s as well as the write:
#   conditional-create                        c s
#   conditional-update, conditional-patch     u s (a conditional update that matches nothing creates, which the
#                                                  update scope covers, as for a plain update)
#   conditional-delete                        d s
# Operations this service implements:
#   $validate                                 r  (an instance-level $validate reads the stored resource; the same
#                                                  rule applies at type level so that it does not depend on the URL)
#   $everything, $export                      r s (they read and search every type they return; Bulk Data asks for
#                                                  read scopes on each exported type)
# A batch or transaction needs no permission of its own: each of its entries is checked as its interaction.
INTERACTIONS: dict[str, str] = {
    "read": "r",
    "vread": "r",
    "history-instance": "r",
    "search": "s",
    "search-type": "s",
    "search-system": "s",
    "history-type": "s",
    "history-system": "s",
    "create": "c",
    "update": "u",
    "patch": "u",
    "delete": "d",
    "conditional-create": "cs",
    "conditional-update": "us",
    "conditional-patch": "us",
    "conditional-delete": "ds",
    "$validate": "r",
    "$everything": "rs",
    "$export": "rs",
}

# RFC 6749 §3.3 scope-token: printable ASCII except space, '"' and '\'.
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_V2_PERMISSIONS = re.compile(r"c?r?u?d?s?")


class ScopeError(ValueError):
    """A scope string that is not a SMART scope; the message names the scope and what is wrong with it."""

    def __init__(self, scope: str, why: str) -> None:
        self.scope = scope
        self.why = why
        super().__init__(f"invalid scope {scope!r}: {why}")


def permissions_for(interaction: str) -> str:
    """The permission letters ``interaction`` needs (all of them), in ``c r u d s`` order; see ``INTERACTIONS``.

    An interaction outside the table is a programming error: the router answers unknown operations before asking."""
    if interaction == "history":
        raise ValueError("'history' is ambiguous: use 'history-instance' (needs r) or 'history-type' (needs s)")
    try:
        return INTERACTIONS[interaction]
    except KeyError:
        raise ValueError(f"unknown interaction {interaction!r}; known: {', '.join(INTERACTIONS)}") from None


@dataclass(frozen=True)
class Scope:
    """One clinical-data scope such as ``system/Observation.rs?category=laboratory``."""

    context: str  # system | user | patient
    resource_type: str  # an R4 resource type, or "*"
    permissions: str  # letters of "cruds", in that order; v1 suffixes are already converted
    query: tuple[tuple[str, str], ...] = ()  # a query-restricted scope's parameters, decoded, in order
    text: str = ""  # as the client wrote it

    @classmethod
    def parse(cls, text: str) -> Scope:
        """A resource scope; ``ScopeError`` naming ``text`` when it is not one."""
        if not _SCOPE_TOKEN.fullmatch(text):
            raise ScopeError(text, "a scope is printable ASCII without spaces, quotes or backslashes")
        base, question_mark, query_text = text.partition("?")
        context, slash, rest = base.partition("/")
        if not slash or context not in CONTEXTS:
            raise ScopeError(text, f"a resource scope starts with one of {', '.join(c + '/' for c in CONTEXTS)}")
        resource_type, dot, suffix = rest.partition(".")
        if not dot:
            raise ScopeError(text, "expected <context>/<resource type>.<permissions>")
        if resource_type != "*" and resource_type not in definitions.resource_types():
            raise ScopeError(text, f"{resource_type!r} is not an R4 resource type (or '*')")
        if suffix in V1_PERMISSIONS:
            if question_mark:
                raise ScopeError(text, "only v2 scopes (c r u d s) may carry a query")
            permissions = V1_PERMISSIONS[suffix]
        elif suffix and _V2_PERMISSIONS.fullmatch(suffix):
            permissions = suffix
        else:
            raise ScopeError(
                text, f"permissions are letters of c r u d s in that order, or read, write or * (got {suffix!r})"
            )
        query: tuple[tuple[str, str], ...] = ()
        if question_mark:
            try:
                query = tuple(parse_qsl(query_text, keep_blank_values=True, strict_parsing=True))
            except ValueError:
                raise ScopeError(text, "the query must be name=value pairs joined by '&'") from None
            if not query or any(not name or not value for name, value in query):
                raise ScopeError(text, "every query parameter needs a name and a value")
        return cls(context, resource_type, permissions, query, text)

    @property
    def v2(self) -> str:
        """The scope in v2 form (``system/Patient.read`` → ``system/Patient.rs``), query as written."""
        _, question_mark, query_text = self.text.partition("?")
        return f"{self.context}/{self.resource_type}.{self.permissions}{question_mark}{query_text}"

    def covers(self, res_type: str) -> bool:
        return self.resource_type in ("*", res_type)

    def __str__(self) -> str:
        return self.text or self.v2


@dataclass(frozen=True)
class Scopes:
    """The scopes of one access token. ``allows`` and ``denied`` answer for system/ scopes without a query; the
    others are kept for whoever applies their restrictions (``matching``)."""

    resource_scopes: tuple[Scope, ...] = ()
    other_scopes: tuple[str, ...] = ()  # openid, launch, offline_access, ...: valid, granting no data access

    @classmethod
    def parse(cls, scopes: str | Iterable[str]) -> Scopes:
        """``scopes`` is a space-separated scope string (the token's ``scope`` claim) or its items. Repeated scopes
        are kept once. ``ScopeError`` names the first scope that is not a SMART scope."""
        items = scopes.split() if isinstance(scopes, str) else [s for item in scopes for s in item.split()]
        resource_scopes: dict[str, Scope] = {}
        other_scopes: dict[str, None] = {}
        for item in items:
            if item in NON_RESOURCE_SCOPES:
                other_scopes[item] = None
            elif item not in resource_scopes:
                resource_scopes[item] = Scope.parse(item)
        return cls(tuple(resource_scopes.values()), tuple(other_scopes))

    def allows(self, res_type: str, interaction: str) -> bool:
        """Whether the scopes permit ``interaction`` (see ``INTERACTIONS``) on ``res_type``. The letters needed may
        come from several scopes: ``system/Patient.u system/Patient.s`` allows a conditional update."""
        return not self._missing(res_type, permissions_for(interaction))

    def denied(self, res_type: str, interaction: str) -> str | None:
        """None when ``allows``; otherwise the scope that would permit the interaction, for the 403 message
        (``system/CarePlan.us`` for a conditional update of a CarePlan)."""
        needed = permissions_for(interaction)
        if not self._missing(res_type, needed):
            return None
        return f"system/{res_type}.{needed}"

    def matching(self, res_type: str, permission: str) -> tuple[Scope, ...]:
        """Every resource scope, of any context and with or without a query, that names ``res_type`` (or ``*``)
        with ``permission`` (one letter of ``c r u d s``)."""
        if permission not in PERMISSIONS or len(permission) != 1:
            raise ValueError(f"a permission is one letter of {PERMISSIONS!r}, not {permission!r}")
        return tuple(s for s in self.resource_scopes if s.covers(res_type) and permission in s.permissions)

    def _missing(self, res_type: str, needed: str) -> str:
        held = {
            letter
            for scope in self.resource_scopes
            if scope.context in GRANTING_CONTEXTS and not scope.query and scope.covers(res_type)
            for letter in scope.permissions
        }
        return "".join(letter for letter in needed if letter not in held)

    def __str__(self) -> str:
        return " ".join([*(str(s) for s in self.resource_scopes), *self.other_scopes])

    def __bool__(self) -> bool:
        return bool(self.resource_scopes or self.other_scopes)
