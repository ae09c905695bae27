"""What one authenticated client may do: its SMART scopes checked for every interaction, the types only some clients
may touch, the /iop routes as FHIR interactions, and for a client acting for a partner the Part 2 restriction of
what it may see (privacy/disclosure.py).

https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from functools import cached_property
from typing import Any

from iop_fhir.errors import Forbidden
from iop_fhir.privacy import authority, disclosure
from iop_fhir.privacy.restriction import Restriction
from iop_fhir.r4 import definitions
from iop_fhir.security.scopes import Scopes
from iop_fhir.store.base import ResourceStore

# The audit trail is for administrators (registered with --admin) and is written by the service alone.
ADMIN_ONLY = frozenset({"AuditEvent"})
SERVICE_WRITTEN = frozenset({"AuditEvent"})
# A Subscription's channel may carry credentials, and its notifications are not weighed per patient against
# consents: only the program's own clients may read or write them.
PROGRAM_ONLY = frozenset({"Subscription"})
WRITES = frozenset(
    {
        "create",
        "update",
        "patch",
        "delete",
        "conditional-create",
        "conditional-update",
        "conditional-patch",
        "conditional-delete",
    }
)

# /iop record kinds as the FHIR type whose scopes govern them (the main resource each record produces).
RECORD_TYPES = {
    "enrollment": "EpisodeOfCare",
    "assessment": "Observation",
    "treatment-plan": "CarePlan",
    "session": "Encounter",
    "group-session": "Encounter",
    "consent": "Consent",
    "discharge": "EpisodeOfCare",
    "medication": "MedicationRequest",
    "partner": "Organization",
    "organization": "Organization",
}
# /iop endpoint name prefixes → the interaction they are.
_RECORD_ACTIONS = {
    "create": "create",
    "list": "search-type",
    "get": "read",
    "update": "update",
    "retract": "update",
    "revoke": "update",
}
# The outcomes (/iop/outcomes, /iop/enrollments/{id}/outcomes, and their pages) are computed from every kind of
# record: they need to search each type those records produce.
OUTCOME_TYPES = ("EpisodeOfCare", "Encounter", "Observation", "CarePlan", "Goal", "Task", "MedicationRequest")
OUTCOME_ENDPOINTS = frozenset(
    {"get_enrollment_outcomes", "get_enrollment_outcomes_html", "get_program_outcomes", "get_program_outcomes_html"}
)
# Renderings of a record (the discharge summary as HTML or PDF) need what reading the record needs.
_RENDERINGS = {"get_discharge_summary_html": "get_discharge", "get_discharge_summary_pdf": "get_discharge"}


@dataclass(frozen=True)
class Principal:
    """The client behind a verified access token."""

    client_id: str
    scopes: Scopes
    partner: str | None = None  # the partner id the client acts for; None: the program's own client
    purpose: str | None = None  # v3-ActReason purpose of use
    admin: bool = False
    consents: bool = False  # the program's consent management: may write Consents through /fhir

    @classmethod
    def from_claims(cls, claims: Any) -> Principal:
        return cls(
            client_id=claims.client_id,
            scopes=claims.scopes,
            partner=claims.partner,
            purpose=claims.purpose_of_use,
            admin=bool(getattr(claims, "admin", False)),
            consents=bool(getattr(claims, "consents", False)) and claims.partner is None,
        )

    @property
    def recipient(self) -> str | None:
        """The partner as a consent names its recipient, ``Organization/<id>``."""
        return f"Organization/{self.partner}" if self.partner else None


class Access:
    """One request's client: ``require`` raises a 403 OperationOutcome naming the scope that is missing, and
    ``restriction`` is computed once, on first use, for a partner's client."""

    def __init__(self, principal: Principal, store: ResourceStore, *, today: date | None = None) -> None:
        self.principal = principal
        self._store = store
        self._today = today

    def require(self, res_type: str, interaction: str) -> None:
        principal = self.principal
        if res_type in SERVICE_WRITTEN and interaction in WRITES:
            raise Forbidden(f"{res_type} resources are written by the service only, never through the API")
        if res_type in ADMIN_ONLY and not principal.admin:
            raise Forbidden(f"{res_type} resources are for administrators only; client {principal.client_id} is not")
        if res_type in PROGRAM_ONLY and principal.partner is not None:
            raise Forbidden(f"{res_type} resources are for the program's own clients, not for a partner's")
        needed = principal.scopes.denied(res_type, interaction)
        if needed is not None:
            raise Forbidden(f"the access token does not permit {interaction} on {res_type}; that needs scope {needed}")

    def authorize_type(self, res_type: str) -> None:
        """Raise Forbidden if the client may write no ``res_type`` at all (privacy/authority.py)."""
        reason = authority.type_refusal(self.principal, res_type)
        if reason is not None:
            raise Forbidden(reason)

    def authorize_change(self, res_type: str, previous: dict[str, Any] | None, resource: dict[str, Any]) -> None:
        """Raise Forbidden if the client may not store ``resource`` over ``previous`` (privacy/authority.py)."""
        reason = authority.change_refusal(self.principal, res_type, previous, resource)
        if reason is not None:
            raise Forbidden(reason)

    def allows(self, res_type: str, interaction: str) -> bool:
        try:
            self.require(res_type, interaction)
        except Forbidden:
            return False
        return True

    def searchable_types(self) -> frozenset[str] | None:
        return self._searchable

    @cached_property
    def _searchable(self) -> frozenset[str] | None:
        types = definitions.resource_types()
        allowed = frozenset(t for t in types if self.allows(t, "history-system"))
        return None if len(allowed) == len(types) else allowed

    @property
    def restriction(self) -> Restriction | None:
        return self._restriction

    @cached_property
    def _restriction(self) -> Restriction | None:
        recipient = self.principal.recipient
        if recipient is None:
            return None
        return disclosure.restriction_for(self._store, recipient, self.principal.purpose, self._today or date.today())

    def require_iop(self, endpoint: str) -> None:
        """The /iop API is the program's own: a partner's client may not use it, and each route needs the scope of
        the FHIR interaction it is on the type its records produce (deliveries: Bundle; referrals: Task)."""
        if self.principal.partner is not None:
            raise Forbidden("the /iop API is for the program's own clients; a partner's client uses /fhir")
        blueprint, _, name = endpoint.partition(".")
        if blueprint == "deliveries":
            # A delivery is a Bundle on its way to a partner: reading them needs Bundle.rs, a retry Bundle.u.
            self.require("Bundle", _iop_interaction(name))
            return
        if blueprint == "referrals":
            self.require("Task", _iop_interaction(name))
            return
        if name == "disclosures":
            self.require("AuditEvent", "search-type")
            return
        if name in OUTCOME_ENDPOINTS:
            for needed in OUTCOME_TYPES:
                self.require(needed, "search-type")
            return
        action, _, kind = _RENDERINGS.get(name, name).partition("_")
        res_type = RECORD_TYPES.get(kind)
        interaction = _RECORD_ACTIONS.get(action)
        if res_type is None or interaction is None:
            raise Forbidden(f"no scope rule covers {endpoint}")
        self.require(res_type, interaction)


def _iop_interaction(name: str) -> str:
    """list_… searches, get_… reads, anything else (retry, accept, admit, …) updates."""
    action = name.split("_", 1)[0]
    return "search-type" if action == "list" else "read" if action == "get" else "update"
