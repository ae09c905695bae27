"""Who may write what decides disclosure, and what each version discloses (privacy/authority.py, visibility.py):
the rules as plain data, without an app."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from iop_fhir.privacy import authority, visibility
from iop_fhir.r4 import indexing

ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"


@dataclass(frozen=True)
class Writer:
    partner: str | None = None
    consents: bool = False


PARTNER = Writer(partner="passaic-valley-recovery")
PROGRAM = Writer()
CONSENT_DESK = Writer(consents=True)


@pytest.mark.parametrize("res_type", ["Consent", "Group"])
def test_a_partner_may_write_no_consent_and_no_group(res_type: str) -> None:
    reason = authority.type_refusal(PARTNER, res_type)
    assert reason is not None and res_type in reason


def test_only_the_consent_desk_among_program_clients_writes_consents() -> None:
    assert "consent-management" in (authority.type_refusal(PROGRAM, "Consent") or "")
    assert authority.type_refusal(CONSENT_DESK, "Consent") is None
    assert authority.type_refusal(PROGRAM, "Group") is None


@pytest.mark.parametrize("res_type", ["Patient", "Condition", "ServiceRequest", "Task", "Observation"])
def test_a_partner_may_write_clinical_types_its_scopes_allow(res_type: str) -> None:
    assert authority.type_refusal(PARTNER, res_type) is None


def test_a_partner_may_add_labels_but_never_remove_or_change_one() -> None:
    before = {"resourceType": "Observation", "meta": {"security": [{"system": ACT, "code": "42CFRPart2"}]}}
    more = {"resourceType": "Observation", "meta": {"security": [{"system": ACT, "code": "42CFRPart2"}, {"code": "x"}]}}
    changed = {"resourceType": "Observation", "meta": {"security": [{"system": ACT, "code": "SUD"}]}}
    assert authority.change_refusal(PARTNER, "Observation", before, more) is None
    reason = authority.change_refusal(PARTNER, "Observation", before, changed)
    assert reason is not None and f"{ACT}|42CFRPart2" in reason
    assert authority.change_refusal(PARTNER, "Observation", before, {"resourceType": "Observation"}) is not None
    assert authority.change_refusal(PROGRAM, "Observation", before, changed) is None
    assert authority.change_refusal(PARTNER, "Observation", None, changed) is None


def test_a_partner_may_not_change_a_patients_links() -> None:
    before = {"resourceType": "Patient", "link": [{"other": {"reference": "Patient/a"}, "type": "seealso"}]}
    assert "Patient.link" in (authority.change_refusal(PARTNER, "Patient", before, {"resourceType": "Patient"}) or "")
    assert authority.change_refusal(PARTNER, "Patient", before, dict(before)) is None


def test_a_version_belongs_to_every_patient_it_refers_to_and_a_patient_to_itself() -> None:
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": "Patient/a"},
        "performer": [{"reference": "Patient/b"}, {"reference": "https://elsewhere.example/Patient/c"}],
        "meta": {"security": [{"system": ACT, "code": "PSYTHPN"}]},
    }
    facts = visibility.facts_of({**observation, "id": "o1"}, indexing.extract(observation))
    assert facts.patients == ("a", "b", "c")  # an absolute reference counts as the id it ends with: stricter
    assert (facts.protected, facts.note) == (True, True)
    patient = visibility.version_facts({"resourceType": "Patient", "id": "p1"})
    assert (patient.patients, patient.protected, patient.note) == (("p1",), False, False)
