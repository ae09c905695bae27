"""Part 2 consent decisions over R4 Consent provisions: recipient, period, status, purpose, labels, nested denies."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from iop_fhir.mapping.engine import PART2_LABELS
from iop_fhir.privacy import consent as part2
from iop_fhir.privacy.consent import CONSENT_DENY, CONSENT_PERMIT, NO_CONSENT, decide

PARTNER = "Organization/test-peer-recovery-center"
OTHER = "Organization/test-regional-ehr"
ON = date(2026, 5, 1)
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
GOLDEN = Path(__file__).resolve().parents[1] / "data" / "consent"

RECORD = PART2_LABELS
COUNSELING_NOTE = [*PART2_LABELS, {"system": ACT_CODE, "code": "PSYTHPN"}]


def label(code: str) -> dict[str, str]:
    return {"system": ACT_CODE, "code": code}


def consent(
    cid: str,
    *,
    signed: str = "2026-03-20",
    status: str = "active",
    kind: str = "permit",
    recipient: str | None = PARTNER,
    purposes: tuple[str, ...] = ("TREAT",),
    labels: tuple[str, ...] = ("SUD",),
    deny: tuple[str, ...] = ("PSYTHPN",),
    end: str | None = "2027-03-20",
    action: str = "disclose",
) -> dict[str, Any]:
    """A Consent in the shape of mappings/consent.yaml (TERMINOLOGY.md §6.3)."""
    provision: dict[str, Any] = {
        "type": kind,
        "period": {"start": signed, **({"end": end} if end else {})},
        "action": [{"coding": [{"system": part2.CONSENT_ACTION, "code": action}]}],
    }
    if recipient is not None:
        provision["actor"] = [
            {
                "role": {"coding": [{"system": part2.PARTICIPATION_TYPE, "code": "IRCP"}]},
                "reference": {"reference": recipient},
            }
        ]
    if purposes:
        provision["purpose"] = [{"system": part2.ACT_REASON, "code": p} for p in purposes]
    if labels:
        provision["securityLabel"] = [label(code) for code in labels]
    if deny:
        provision["provision"] = [{"type": "deny", "securityLabel": [label(code) for code in deny]}]
    return {
        "resourceType": "Consent",
        "id": cid,
        "status": status,
        "scope": {"coding": [{"system": part2.CONSENT_SCOPE, "code": "patient-privacy"}]},
        "patient": {"reference": "Patient/p1"},
        "dateTime": signed,
        "provision": provision,
    }


TPO = consent("tpo", purposes=("TREAT", "HPAYMT", "HOPERAT"))
NOTES = consent("notes", signed="2026-04-01", labels=("PSYTHPN",), deny=())

CASES = [
    pytest.param([TPO], PARTNER, "TREAT", RECORD, ON, CONSENT_PERMIT, "tpo", id="permit"),
    pytest.param([TPO], OTHER, "TREAT", RECORD, ON, NO_CONSENT, None, id="wrong-recipient"),
    pytest.param([TPO], PARTNER, "TREAT", RECORD, date(2027, 3, 21), NO_CONSENT, None, id="expired"),
    pytest.param([TPO], PARTNER, "TREAT", RECORD, date(2027, 3, 20), CONSENT_PERMIT, "tpo", id="last-day-is-covered"),
    pytest.param([TPO], PARTNER, "TREAT", RECORD, date(2026, 3, 19), NO_CONSENT, None, id="not-yet-valid"),
    pytest.param([consent("c", end=None)], PARTNER, "TREAT", RECORD, date(2030, 1, 1), CONSENT_PERMIT, "c", id="open"),
    *[
        pytest.param([consent("c", status=s)], PARTNER, "TREAT", RECORD, ON, NO_CONSENT, None, id=f"status-{s}")
        for s in ("inactive", "rejected", "entered-in-error", "draft", "proposed")
    ],
    pytest.param([consent("c")], PARTNER, "HPAYMT", RECORD, ON, NO_CONSENT, None, id="wrong-purpose"),
    pytest.param([consent("c")], PARTNER, "COC", RECORD, ON, CONSENT_PERMIT, "c", id="coc-under-treat"),
    pytest.param([consent("c")], PARTNER, "ETREAT", RECORD, ON, CONSENT_PERMIT, "c", id="etreat-under-treat"),
    pytest.param([consent("c", purposes=("COC",))], PARTNER, "TREAT", RECORD, ON, NO_CONSENT, None, id="coc-not-treat"),
    pytest.param([consent("c", purposes=())], PARTNER, "HPAYMT", RECORD, ON, CONSENT_PERMIT, "c", id="any-purpose"),
    pytest.param([TPO], PARTNER, "TREAT", [label("OPIOIDUD")], ON, CONSENT_PERMIT, "tpo", id="opioid-under-sud"),
    pytest.param([TPO], PARTNER, "TREAT", [label("HIV")], ON, NO_CONSENT, None, id="label-not-covered"),
    pytest.param([TPO], PARTNER, "TREAT", COUNSELING_NOTE, ON, CONSENT_DENY, "tpo", id="counseling-note-denied"),
    pytest.param([NOTES], PARTNER, "TREAT", COUNSELING_NOTE, ON, CONSENT_PERMIT, "notes", id="note-own-consent"),
    pytest.param([TPO, NOTES], PARTNER, "TREAT", COUNSELING_NOTE, ON, CONSENT_PERMIT, "notes", id="note-both"),
    pytest.param(
        [consent("tpo-renewed", signed="2026-04-20"), NOTES],
        PARTNER,
        "TREAT",
        COUNSELING_NOTE,
        ON,
        CONSENT_PERMIT,
        "notes",
        id="note-consent-outlives-newer-tpo-carve-out",
    ),
    pytest.param([NOTES], PARTNER, "TREAT", RECORD, ON, NO_CONSENT, None, id="note-consent-not-for-records"),
    pytest.param(
        [consent("c", deny=())], PARTNER, "TREAT", COUNSELING_NOTE, ON, NO_CONSENT, None, id="note-needs-named-label"
    ),
    pytest.param(
        [consent("c", labels=(), deny=())], PARTNER, "TREAT", COUNSELING_NOTE, ON, NO_CONSENT, None, id="note-no-labels"
    ),
    pytest.param(
        [consent("old"), consent("opt-out", signed="2026-04-01", kind="deny", purposes=(), labels=(), deny=())],
        PARTNER,
        "TREAT",
        RECORD,
        ON,
        CONSENT_DENY,
        "opt-out",
        id="newest-deny-wins",
    ),
    pytest.param(
        [consent("opt-out", kind="deny", purposes=(), labels=(), deny=()), consent("new", signed="2026-04-01")],
        PARTNER,
        "TREAT",
        RECORD,
        ON,
        CONSENT_PERMIT,
        "new",
        id="newest-permit-wins",
    ),
    pytest.param(
        [consent("old"), consent("new", signed="2026-04-01"), consent("older", signed="2026-03-01")],
        PARTNER,
        "TREAT",
        RECORD,
        ON,
        CONSENT_PERMIT,
        "new",
        id="newest-permit-is-named",
    ),
    pytest.param(
        [consent("old"), consent("new-revoked", signed="2026-04-01", status="inactive")],
        PARTNER,
        "TREAT",
        RECORD,
        ON,
        CONSENT_PERMIT,
        "old",
        id="revoking-one-consent-leaves-another",
    ),
    pytest.param(
        [
            consent("opt-out-all", signed="2026-03-22", kind="deny", recipient=None, purposes=(), labels=(), deny=()),
            consent("older-permit"),
        ],
        PARTNER,
        "TREAT",
        RECORD,
        date(2026, 3, 25),
        CONSENT_DENY,
        "opt-out-all",
        id="deny-without-actor-applies-to-everyone",
    ),
    pytest.param([consent("c", recipient=None)], PARTNER, "TREAT", RECORD, ON, NO_CONSENT, None, id="permit-no-actor"),
    pytest.param([consent("c", action="collect")], PARTNER, "TREAT", RECORD, ON, NO_CONSENT, None, id="not-disclose"),
    pytest.param([], PARTNER, "TREAT", RECORD, ON, NO_CONSENT, None, id="no-consent"),
]


@pytest.mark.parametrize(("consents", "recipient", "purpose", "labels", "on", "result", "consent_id"), CASES)
def test_decision_follows_the_consent_provisions(
    consents: list[dict[str, Any]],
    recipient: str,
    purpose: str,
    labels: list[dict[str, Any]],
    on: date,
    result: str,
    consent_id: str | None,
) -> None:
    decision = decide(consents, recipient, purpose, labels, on)

    assert (decision.result, decision.consent) == (result, f"Consent/{consent_id}" if consent_id else None)
    assert decision.permit is (result == CONSENT_PERMIT)
    assert decision.reason


def test_a_consent_that_is_not_a_privacy_consent_never_permits() -> None:
    treatment = consent("c")
    treatment["scope"] = {"coding": [{"system": part2.CONSENT_SCOPE, "code": "treatment"}]}

    decision = decide([treatment], PARTNER, "TREAT", RECORD, ON)

    assert decision.result == NO_CONSENT
    assert "Consent/c is not a privacy consent" in decision.reason


def test_a_nested_deny_for_one_purpose_keeps_that_purpose_out() -> None:
    tpo = consent("c", purposes=("TREAT", "HPAYMT"), deny=())
    tpo["provision"]["provision"] = [
        {"type": "deny", "purpose": [{"system": part2.ACT_REASON, "code": "HPAYMT"}]},
    ]

    assert decide([tpo], PARTNER, "TREAT", RECORD, ON).result == CONSENT_PERMIT
    assert decide([tpo], PARTNER, "HPAYMT", RECORD, ON).result == CONSENT_DENY


def test_no_consent_reason_says_why_each_consent_does_not_apply() -> None:
    consents = [
        consent("expired", end="2026-04-01"),
        consent("other", recipient=OTHER),
        consent("gone", status="inactive"),
    ]

    decision = decide(consents, PARTNER, "TREAT", RECORD, ON)

    assert decision.result == NO_CONSENT
    assert decision.consent is None
    assert "Consent/expired ended on 2026-04-01" in decision.reason
    assert f"Consent/other is not for {PARTNER}" in decision.reason
    assert "Consent/gone is inactive" in decision.reason


def golden_consents() -> list[dict[str, Any]]:
    return [entry["resource"] for path in sorted(GOLDEN.glob("*.fhir.json")) for entry in json.loads(path.read_text())]


@pytest.mark.parametrize("produced", golden_consents(), ids=lambda c: c["id"])
def test_consents_the_mapping_produces_permit_what_they_name(produced: dict[str, Any]) -> None:
    provision = produced["provision"]
    recipient = provision["actor"][0]["reference"]["reference"]
    signed = date.fromisoformat(produced["dateTime"])
    for_notes = {"system": ACT_CODE, "code": "PSYTHPN"} in [
        {"system": c["system"], "code": c["code"]} for c in provision["securityLabel"]
    ]

    for purpose in [c["code"] for c in provision["purpose"]]:
        record = decide([produced], recipient, purpose, RECORD, signed)
        note = decide([produced], recipient, purpose, COUNSELING_NOTE, signed)
        assert record.result == (NO_CONSENT if for_notes else CONSENT_PERMIT)
        assert note.result == (CONSENT_PERMIT if for_notes else CONSENT_DENY)
    assert decide([produced], OTHER if recipient != OTHER else PARTNER, "TREAT", RECORD, signed).result == NO_CONSENT
