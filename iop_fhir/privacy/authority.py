"""Who may write what decides disclosure (42 CFR §2.31: only the patient, through the program, consents).

- A Consent grants or denies disclosure: only the program writes one, through the /iop consent endpoints (the
  record service) or with a client registered as the program's consent management (``iop-fhir client add
  --consents``, token claim ``iop_consents``). Any other client, and a partner's client always, gets 403.
- A partner's client may write clinical data it is given scopes for (referral intake: Patient, Condition,
  ServiceRequest, Task), but nothing that would widen what it sees: no Group (the membership a Group $export
  exports), no change to a Patient's ``link``, and no label of a stored version removed or changed (it may add
  labels). Its writes may refer only to Patients it may see or that the same request created (the repository
  checks that: references to any other Patient are answered as references to a Patient that does not exist).

The rules are pure: ``type_refusal`` and ``change_refusal`` say why a write is refused, or None.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

CONSENT_TYPES = frozenset({"Consent"})
# Types a partner's client never writes: they decide what it sees or exports.
NOT_FOR_PARTNERS = frozenset({"Consent", "Group"})


class Writer(Protocol):
    """The client writing (security/access.py Principal)."""

    @property
    def partner(self) -> str | None: ...

    @property
    def consents(self) -> bool: ...


def type_refusal(writer: Writer, res_type: str) -> str | None:
    """Why ``writer`` may write no resource of ``res_type`` at all (decided before anything is looked up, so that
    the answer is the same whether or not a resource exists)."""
    if writer.partner is not None and res_type in NOT_FOR_PARTNERS:
        return f"a partner's client may not write {res_type} resources: they decide what is disclosed to it"
    if res_type in CONSENT_TYPES and not writer.consents:
        return (
            "writing a Consent needs the program's consent-management permission (a client registered with "
            "`iop-fhir client add --consents`); consents are recorded through POST /iop/consents"
        )
    return None


def change_refusal(
    writer: Writer, res_type: str, previous: Mapping[str, Any] | None, resource: Mapping[str, Any]
) -> str | None:
    """Why ``writer`` may not store ``resource`` over ``previous`` (None: nothing live before)."""
    if writer.partner is None or previous is None:
        return None
    if res_type == "Patient" and (previous.get("link") or []) != (resource.get("link") or []):
        return "a partner's client may not change Patient.link"
    removed = labels(previous) - labels(resource)
    if removed:
        shown = ", ".join(f"{system}|{code}" for system, code in sorted(removed))
        return f"a partner's client may not remove or change the security labels of a resource ({shown})"
    return None


def labels(resource: Mapping[str, Any]) -> set[tuple[str, str]]:
    """The (system, code) pairs of ``meta.security``."""
    security = (resource.get("meta") or {}).get("security") or []
    return {
        (str(label.get("system", "")), str(label.get("code", ""))) for label in security if isinstance(label, Mapping)
    }
