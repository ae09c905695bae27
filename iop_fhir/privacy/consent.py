"""Part 2 consent decisions: may a labelled resource go to a recipient, for a purpose, on a day, under the patient's
FHIR Consents (R4 provision model, https://hl7.org/fhir/R4/consent.html#provision; LEAP-CDS decision vocabulary)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any, Literal

ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
CONSENT_ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"

Result = Literal["NO_CONSENT", "CONSENT_PERMIT", "CONSENT_DENY"]
NO_CONSENT: Result = "NO_CONSENT"
CONSENT_PERMIT: Result = "CONSENT_PERMIT"
CONSENT_DENY: Result = "CONSENT_DENY"

# v3-ActReason PurposeOfUse hierarchy for the codes of TERMINOLOGY.md §6.2: a consent for the parent covers the child
# (TREAT covers COC), never the reverse. Codes not listed match only themselves.
PURPOSE_PARENT = {"COC": "TREAT", "ETREAT": "TREAT", "CAREMGT": "HOPERAT"}
# v3-ActCode sensitivity hierarchy: a provision on SUD covers alcohol and opioid use disorder information.
LABEL_PARENT = {(ACT_CODE, "ETHUD"): (ACT_CODE, "SUD"), (ACT_CODE, "OPIOIDUD"): (ACT_CODE, "SUD")}
# SUD counseling notes need a consent of their own (42 CFR Part 2, 2024 rule): a permit covers a resource carrying one
# of these labels only if the permit, or a provision it is nested in, names the label.
OWN_CONSENT_LABELS = frozenset({(ACT_CODE, "PSYTHPN")})

Label = tuple[str, str]
_Verdict = Literal["permit", "deny"]


@dataclass(frozen=True)
class Decision:
    """The answer for one disclosure: the LEAP-CDS result, the Consent it rests on, and why (codes and references
    only, safe to log)."""

    result: Result
    consent: str | None
    reason: str

    @property
    def permit(self) -> bool:
        return self.result == CONSENT_PERMIT


@dataclass(frozen=True)
class _Request:
    recipient: str
    purpose: str
    labels: frozenset[Label]
    day: str


@dataclass(frozen=True)
class _Judgement:
    """What one Consent says: a directive (permit, or a deny at its root), an exclusion (a nested deny carving the
    resource out of a permit), or nothing (None) with the reason it does not apply."""

    consent: Mapping[str, Any]
    verdict: Literal["permit", "deny", "excluded"] | None
    reason: str


def decide(
    consents: Sequence[Mapping[str, Any]],
    recipient: str,
    purpose: str,
    labels: Iterable[Mapping[str, Any]],
    on: date,
) -> Decision:
    """Whether a resource carrying `labels` (its meta.security codings) may be disclosed to `recipient`
    ("Organization/<id>") for `purpose` (a v3-ActReason code) on day `on`, under the Consents of its patient.

    Only active patient-privacy Consents count; a root provision applies when its period covers the day, its IRCP
    actor is the recipient, its purposes cover the purpose and its security labels cover the resource. Within a
    Consent a matching nested deny wins over the permit around it. Across Consents the newest directive (by
    Consent.dateTime) wins; a nested deny in one Consent does not cancel another Consent's permit (a consent for SUD
    counseling notes still permits them when a treatment consent keeps them out).
    """
    request = _Request(recipient, purpose, frozenset(_system_codes(labels)), on.isoformat()[:10])
    judgements = [_judge(consent, request) for consent in consents]
    directives = sorted(
        (j for j in judgements if j.verdict in ("permit", "deny")),
        key=lambda j: (_signed(j.consent), _updated(j.consent), j.verdict == "deny"),
        reverse=True,
    )
    if directives:
        newest = directives[0]
        result = CONSENT_PERMIT if newest.verdict == "permit" else CONSENT_DENY
        return Decision(result, _reference(newest.consent), newest.reason)
    excluded = sorted((j for j in judgements if j.verdict == "excluded"), key=lambda j: _signed(j.consent))
    if excluded:
        return Decision(CONSENT_DENY, _reference(excluded[-1].consent), excluded[-1].reason)
    if not consents:
        return Decision(NO_CONSENT, None, "the patient has no consent")
    details = "; ".join(j.reason for j in judgements)
    return Decision(NO_CONSENT, None, f"no consent permits disclosure to {recipient} for {purpose}: {details}")


def _judge(consent: Mapping[str, Any], request: _Request) -> _Judgement:
    ref = _reference(consent) or "a Consent without id"
    if consent.get("resourceType") != "Consent":
        return _Judgement(consent, None, f"{ref} is not a Consent")
    status = consent.get("status")
    if status != "active":
        return _Judgement(consent, None, f"{ref} is {status or 'without status'}")
    if not any(
        c.get("system") == CONSENT_SCOPE and c.get("code") == "patient-privacy" for c in _codings(consent.get("scope"))
    ):
        return _Judgement(consent, None, f"{ref} is not a privacy consent")
    root = consent.get("provision")
    kind = root.get("type") if isinstance(root, Mapping) else None
    if not isinstance(root, Mapping) or kind not in ("permit", "deny"):
        return _Judgement(consent, None, f"{ref} has no permit or deny provision")
    # A permit must name its recipient; a deny without actors (an opt-out) applies to every recipient.
    if kind == "permit" and not _recipients(root):
        return _Judgement(consent, None, f"{ref} names no recipient")
    mismatch = _mismatch(root, request)
    if mismatch is not None:
        return _Judgement(consent, None, f"{ref} {mismatch}")
    verdict = _verdict(root, request, kind, frozenset())
    if verdict is None:
        own = ", ".join(code for _, code in sorted(request.labels & OWN_CONSENT_LABELS))
        return _Judgement(consent, None, f"{ref} does not name {own}, which needs a consent of its own")
    if kind == "permit" and verdict == "deny":
        return _Judgement(consent, "excluded", f"a deny provision of {ref} covers the resource")
    says = "permits" if verdict == "permit" else "denies"
    return _Judgement(consent, verdict, f"{ref} {says} disclosure to {request.recipient} for {request.purpose}")


def _verdict(
    provision: Mapping[str, Any], request: _Request, inherited: str, named: frozenset[Label]
) -> _Verdict | None:
    """The verdict of a provision that applies, with its nested provisions as exceptions: a matching nested deny wins
    over everything around it, a matching nested permit lifts a deny around it."""
    kind = provision.get("type") or inherited
    named = named | frozenset(_system_codes(provision.get("securityLabel") or []))
    verdict: _Verdict | None
    if kind == "deny":
        verdict = "deny"
    else:
        verdict = "permit" if (request.labels & OWN_CONSENT_LABELS) <= named else None
    for child in provision.get("provision") or []:
        if not isinstance(child, Mapping) or _mismatch(child, request) is not None:
            continue
        nested = _verdict(child, request, kind, named)
        if nested == "deny":
            return "deny"
        if nested == "permit":
            verdict = "permit"
    return verdict


def _mismatch(provision: Mapping[str, Any], request: _Request) -> str | None:
    """Why a provision does not apply to the request, or None when it does. An element a provision leaves out does
    not restrict it (R4: the provision then applies to every actor, purpose, label)."""
    period = provision.get("period") or {}
    start, end = str(period.get("start") or "")[:10], str(period.get("end") or "")[:10]
    if start and request.day < start:
        return f"is not in force before {start}"
    if end and request.day > end:
        return f"ended on {end}"
    actors = _recipients(provision)
    if provision.get("actor") and request.recipient not in actors:
        return f"is not for {request.recipient}"
    actions = [c for concept in provision.get("action") or [] for c in _codings(concept)]
    if actions and not any(c.get("system") == CONSENT_ACTION and c.get("code") == "disclose" for c in actions):
        return "does not cover disclosure"
    purposes = {code for system, code in _system_codes(provision.get("purpose") or []) if system == ACT_REASON}
    if provision.get("purpose") and not purposes & _purpose_and_parents(request.purpose):
        return f"does not cover purpose {request.purpose}"
    scope = set(_system_codes(provision.get("securityLabel") or []))
    if scope and not any(_label_and_parents(label) & scope for label in request.labels):
        return "does not cover the resource's security labels"
    return None


def _recipients(provision: Mapping[str, Any]) -> set[str]:
    return {
        str(actor["reference"].get("reference"))
        for actor in provision.get("actor") or []
        if isinstance(actor, Mapping)
        and isinstance(actor.get("reference"), Mapping)
        and any(c.get("system") == PARTICIPATION_TYPE and c.get("code") == "IRCP" for c in _codings(actor.get("role")))
    }


def _purpose_and_parents(purpose: str) -> set[str]:
    found = {purpose}
    while purpose in PURPOSE_PARENT:
        purpose = PURPOSE_PARENT[purpose]
        found.add(purpose)
    return found


def _label_and_parents(label: Label) -> set[Label]:
    found = {label}
    while label in LABEL_PARENT:
        label = LABEL_PARENT[label]
        found.add(label)
    return found


def _system_codes(codings: Iterable[Any]) -> list[Label]:
    return [
        (str(c["system"]), str(c["code"]))
        for c in codings
        if isinstance(c, Mapping) and c.get("system") and c.get("code")
    ]


def _codings(concept: Any) -> list[Mapping[str, Any]]:
    if not isinstance(concept, Mapping):
        return []
    return [c for c in concept.get("coding") or [] if isinstance(c, Mapping)]


def _reference(consent: Mapping[str, Any]) -> str | None:
    return f"Consent/{consent['id']}" if consent.get("id") else None


def _signed(consent: Mapping[str, Any]) -> str:
    return str(consent.get("dateTime") or "")


def _updated(consent: Mapping[str, Any]) -> str:
    meta = consent.get("meta")
    return str(meta.get("lastUpdated") or "") if isinstance(meta, Mapping) else ""
