"""Disclosures to partners are consent-gated end to end and accountable, on both databases: a consent recorded later
releases what waits for it (rebuilt with the Consent), a revoked consent stops every later delivery (the worker
decides again right before sending), and every delivered Bundle leaves a row of the audit log, an AuditEvent of the
disclosure at /fhir/AuditEvent."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import pytest
import responses

from iop_fhir import runtime
from iop_fhir.exchange.document import documents_in
from iop_fhir.privacy import pushes
from iop_fhir.store.base import Delivery
from tests.auth import admin_token

CONTRACT = Path(__file__).resolve().parents[3] / "shared" / "contract"
PARTNER_BASE = "http://fhir.aftercare.example/R4"
UNIT_BASE = "http://ehr.unit.example/R4"
FHIR = "application/fhir+json"
IRCP = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ANSWER = {"resourceType": "Bundle", "type": "transaction-response", "entry": []}


def contract(kind: str, enrollment_id: str | None = None) -> dict[str, Any]:
    text = (CONTRACT / f"{kind}.json").read_text(encoding="utf-8")
    payload: dict[str, Any] = json.loads(text.replace("{{enrollment_id}}", enrollment_id or ""))
    return payload


def consent_payload(enrollment_id: str, recipient: str = "passaic-valley-recovery") -> dict[str, Any]:
    payload = contract("consent", enrollment_id)
    payload["recipient"] = recipient
    del payload["expires_on"]  # in force whenever the test runs
    return payload


@pytest.fixture
def enrolled(client: Any) -> str:
    partner = contract("partner")
    partner.update(fhir_base_url=PARTNER_BASE, auth={"type": "none"})
    assert client.post("/iop/partners", json=partner).status_code == 201
    enrollment_id: str = client.post("/iop/enrollments", json=contract("enrollment")).get_json()["id"]
    assert client.post("/iop/treatment-plans", json=contract("treatment-plan", enrollment_id)).status_code == 201
    return enrollment_id


def rows(app: Any, **filters: Any) -> list[Delivery]:
    found, _ = app.extensions["iop_fhir.store"].deliveries(count=100, **filters)
    return list(found)


def run_worker(app: Any) -> None:
    assert runtime.run_worker(app.config["IOP_FHIR"], once=True, store=app.extensions["iop_fhir.store"]) == 0


def types(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["resourceType"] for e in bundle["entry"]]


def audit_events(app: Any, *params: tuple[str, str]) -> list[dict[str, Any]]:
    """The AuditEvents of disclosures the worker made, found by an administrator's search of /fhir/AuditEvent (the
    API audits its own interactions beside them)."""
    admin = app.test_client()
    admin.token = admin_token(app)
    response = admin.get("/fhir/AuditEvent", query_string=[("type", "110106"), *params, ("_count", "500")])
    assert response.status_code == 200, response.get_json()
    events = [e["resource"] for e in response.get_json().get("entry", [])]
    return [e for e in events if _by_worker(e)]


def _by_worker(event: dict[str, Any]) -> bool:
    return any((a.get("who") or {}).get("identifier", {}).get("value") == pushes.CLIENT_ID for a in event["agent"])


def patient_of(client: Any, enrollment_id: str) -> str:
    enrollment = client.get(f"/iop/enrollments/{enrollment_id}").get_json()
    return next(r for r in enrollment["fhir"] if r.startswith("Patient/"))


# -- a consent recorded later ------------------------------------------------------------------------------------


@responses.activate
def test_a_consent_recorded_later_releases_the_blocked_transition_rebuilt_with_the_consent(
    app: Any, client: Any, enrolled: str
) -> None:
    posted = responses.post(PARTNER_BASE, json=ANSWER, status=200)
    discharge = client.post("/iop/discharges", json=contract("discharge", enrolled)).get_json()
    run_worker(app)
    assert posted.call_count == 0
    [blocked] = rows(app, record_id=discharge["id"])
    assert blocked.status == "blocked"

    consent = client.post("/iop/consents", json=consent_payload(enrolled)).get_json()

    old, new = rows(app, record_id=discharge["id"])
    assert (old.id, old.status) == (blocked.id, "superseded")  # kept, never sent, names what replaced it
    assert new.id in (old.last_error or {})["message"]
    assert old.payload == blocked.payload
    assert (new.status, new.attempts) == ("pending", 0)
    # the partner's Organization goes too: the Task's owner and the Consent's recipient resolve at the receiver
    assert types(new.payload["body"]) == [
        "Patient",
        "Organization",
        "CarePlan",
        "ServiceRequest",
        "Task",
        "Consent",
        "Bundle",
    ]
    consent_ref = next(r for r in consent["fhir"] if r.startswith("Consent/"))
    assert new.payload["body"]["entry"][5]["fullUrl"] == f"urn:uuid:{consent_ref.split('/')[1]}"
    # The transition-of-care document is rebuilt too, now with the Consent that permits it.
    [document] = documents_in(new.payload["body"])
    assert f"https://iop-fhir.org/fhir/{consent_ref}" in [e["fullUrl"] for e in document["entry"]]
    [held_back] = documents_in(blocked.payload["body"])
    assert "Consent" not in types(held_back)

    run_worker(app)
    assert posted.call_count == 1
    sent = orjson.loads(responses.calls[0].request.body)
    assert types(sent) == types(new.payload["body"])
    assert [r.status for r in rows(app, record_id=discharge["id"])] == ["superseded", "delivered"]


def test_a_consent_for_another_partner_releases_nothing(app: Any, client: Any, enrolled: str) -> None:
    other = {**contract("partner"), "id": "another-aftercare", "auth": {"type": "none"}}
    assert client.post("/iop/partners", json=other).status_code == 201
    discharge = client.post("/iop/discharges", json=contract("discharge", enrolled)).get_json()
    assert client.post("/iop/consents", json=consent_payload(enrolled, "another-aftercare")).status_code == 201
    assert [r.status for r in rows(app, record_id=discharge["id"])] == ["blocked"]


def test_a_consent_that_does_not_cover_care_coordination_releases_nothing(app: Any, client: Any, enrolled: str) -> None:
    discharge = client.post("/iop/discharges", json=contract("discharge", enrolled)).get_json()
    payment_only = {**consent_payload(enrolled), "purposes": ["payment"]}
    assert client.post("/iop/consents", json=payment_only).status_code == 201
    [row] = rows(app, record_id=discharge["id"])
    assert row.status == "blocked"
    assert (row.last_error or {})["message"].startswith(pushes.NO_CONSENT)


# -- revocation ----------------------------------------------------------------------------------------------------


def test_revoking_a_consent_makes_its_fhir_consent_inactive_and_keeps_the_day(client: Any, enrolled: str) -> None:
    consent = client.post("/iop/consents", json=consent_payload(enrolled)).get_json()
    response = client.post(f"/iop/consents/{consent['id']}/revoke", json={"revoked_on": "2026-04-01"})
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["revoked_on"] == "2026-04-01"
    reference = next(r for r in consent["fhir"] if r.startswith("Consent/"))
    resource = client.get(f"/fhir/{reference}").get_json()
    assert resource["status"] == "inactive"
    assert resource["extension"] == [
        {"url": "https://iop-fhir.org/fhir/StructureDefinition/consent-revoked", "valueDate": "2026-04-01"}
    ]
    again = client.post(f"/iop/consents/{consent['id']}/revoke", json={"revoked_on": "2026-04-01"})
    assert again.status_code == 200


def test_a_revoked_consent_cannot_be_reactivated_by_a_put(client: Any, enrolled: str) -> None:
    consent = client.post("/iop/consents", json=consent_payload(enrolled)).get_json()
    client.post(f"/iop/consents/{consent['id']}/revoke", json={"revoked_on": "2026-04-01"})
    response = client.put(f"/iop/consents/{consent['id']}", json=consent_payload(enrolled))
    assert response.status_code == 409
    assert response.get_json()["issue"][0]["expression"] == ["revoked_on"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"revoked_on": "2026-03-01"}, "invariant"),  # before signed_on (2026-03-20)
        ({"revoked_on": "2999-01-01"}, "invariant"),  # in the future
        ({}, "required"),
    ],
)
def test_a_revocation_must_be_dated_between_signature_and_today(
    client: Any, enrolled: str, body: dict[str, Any], code: str
) -> None:
    consent = client.post("/iop/consents", json=consent_payload(enrolled)).get_json()
    response = client.post(f"/iop/consents/{consent['id']}/revoke", json=body)
    assert response.status_code == 400, response.get_json()
    issue = response.get_json()["issue"][0]
    assert (issue["code"], issue["expression"]) == (code, ["revoked_on"])
    assert client.get(f"/iop/consents/{consent['id']}").get_json().get("revoked_on") is None


def test_a_retracted_consent_cannot_be_revoked(client: Any, enrolled: str) -> None:
    consent = client.post("/iop/consents", json=consent_payload(enrolled)).get_json()
    client.post(f"/iop/consents/{consent['id']}/retract")
    response = client.post(f"/iop/consents/{consent['id']}/revoke", json={"revoked_on": "2026-04-01"})
    assert response.status_code == 409
    assert response.get_json()["issue"][0]["code"] == "business-rule"


@responses.activate
def test_revoking_the_consent_blocks_the_pending_transition_and_nothing_is_sent(
    app: Any, client: Any, enrolled: str
) -> None:
    posted = responses.post(PARTNER_BASE, json=ANSWER, status=200)
    consent = client.post("/iop/consents", json=consent_payload(enrolled)).get_json()
    discharge = client.post("/iop/discharges", json=contract("discharge", enrolled)).get_json()
    assert [r.status for r in rows(app, record_id=discharge["id"])] == ["pending"]
    client.post(f"/iop/consents/{consent['id']}/revoke", json={"revoked_on": "2026-04-01"})
    [row] = rows(app, record_id=discharge["id"])
    assert row.status == "blocked"
    assert "is inactive" in (row.last_error or {})["message"]
    run_worker(app)
    assert posted.call_count == 0


@pytest.mark.parametrize("how", ["revoked", "retracted", "expired"])
@responses.activate
def test_the_worker_blocks_a_queued_transition_whose_consent_no_longer_permits_it(
    app: Any, client: Any, enrolled: str, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    posted = responses.post(PARTNER_BASE, json=ANSWER, status=200)
    payload = {**consent_payload(enrolled), "expires_on": "2027-03-20"}
    monkeypatch.setattr(pushes, "today", lambda: date(2026, 12, 2))
    consent = client.post("/iop/consents", json=payload).get_json()
    discharge = client.post("/iop/discharges", json=contract("discharge", enrolled)).get_json()
    [queued] = rows(app, record_id=discharge["id"])
    assert queued.status == "pending"
    # The consent ends behind the outbox's back: its FHIR Consent changed at the FHIR API, or time passed.
    reference = next(r for r in consent["fhir"] if r.startswith("Consent/"))
    if how == "expired":
        monkeypatch.setattr(pushes, "today", lambda: date(2027, 3, 21))
    else:
        resource = client.get(f"/fhir/{reference}").get_json()
        resource["status"] = "inactive" if how == "revoked" else "entered-in-error"
        assert client.put(f"/fhir/{reference}", json=resource, content_type=FHIR).status_code == 200

    run_worker(app)

    assert posted.call_count == 0
    [row] = rows(app, record_id=discharge["id"])
    assert (row.status, row.attempts) == ("blocked", 0)
    message = (row.last_error or {})["message"]
    assert message.startswith("blocked: no consent")
    assert ("ended on 2027-03-20" if how == "expired" else "is ") in message
    assert audit_events(app) == []


# -- accounting ------------------------------------------------------------------------------------------------------


@responses.activate
def test_a_delivered_transition_writes_an_audit_event_naming_patient_recipient_and_every_resource(
    app: Any, client: Any, enrolled: str
) -> None:
    responses.post(PARTNER_BASE, json=ANSWER, status=200)
    assert client.post("/iop/consents", json=consent_payload(enrolled)).status_code == 201
    discharge = client.post("/iop/discharges", json=contract("discharge", enrolled)).get_json()
    [row] = rows(app, record_id=discharge["id"])
    assert audit_events(app) == []

    run_worker(app)

    [event] = audit_events(app)
    patient = patient_of(client, enrolled)
    assert (event["type"]["code"], event["action"], event["outcome"]) == ("110106", "R", "0")
    client_agent, recipient = event["agent"]
    assert client_agent["who"]["identifier"]["value"] == "iop-fhir-worker"
    assert client_agent["purposeOfUse"][0]["coding"][0]["code"] == "TREAT"
    assert recipient["who"] == {"reference": "Organization/passaic-valley-recovery"}
    assert recipient["type"]["coding"][0] == {"system": IRCP, "code": "IRCP", "display": "information recipient"}
    whats = [e["what"]["reference"] for e in event["entity"]]
    assert whats[0] == patient
    assert event["entity"][0]["role"]["code"] == "1"
    kinds = ["Patient", "Organization", "CarePlan", "ServiceRequest", "Task", "Consent", "Bundle"]
    assert [w.split("/")[0] for w in whats] == kinds
    assert whats == pushes.references(row.payload["body"])
    # Searchable like any AuditEvent, by the patient it concerns.
    assert [e["id"] for e in audit_events(app, ("entity", patient))] == [event["id"]]


@responses.activate
def test_a_failed_delivery_writes_no_audit_event(app: Any, client: Any, enrolled: str) -> None:
    responses.post(PARTNER_BASE, json={"resourceType": "OperationOutcome", "issue": []}, status=400)
    assert client.post("/iop/consents", json=consent_payload(enrolled)).status_code == 201
    discharge = client.post("/iop/discharges", json=contract("discharge", enrolled)).get_json()
    run_worker(app)
    assert [r.status for r in rows(app, record_id=discharge["id"])] == ["dead"]
    assert audit_events(app) == []


# -- referral push-backs -------------------------------------------------------------------------------------------

UNIT = {
    "id": "st-joseph-detox",
    "kind": "inpatient-unit",
    "name": "St. Joseph Inpatient Detoxification Unit",
    "fhir_base_url": UNIT_BASE,
    "auth": {"type": "none"},
}
ADMISSION = {"program": "adult-sud", "level_of_care": "2.1", "admission_date": "2026-02-09"}


@pytest.fixture
def referral_id(client: Any) -> str:
    assert client.post("/iop/partners", json=UNIT).status_code == 201
    bundle = json.loads((CONTRACT / "inbound-referral-bundle.json").read_text(encoding="utf-8"))
    bundle["entry"][3]["resource"]["requester"] = {"reference": "Organization/st-joseph-detox"}
    response = client.post("/fhir", data=orjson.dumps(bundle), content_type=FHIR)
    assert response.status_code == 200, response.get_json()
    locations = [e["response"]["location"] for e in response.get_json()["entry"]]
    return next(loc.split("/")[1] for loc in locations if loc.startswith("Task/"))


@responses.activate
def test_answers_before_admission_go_to_the_referring_unit_without_consent_and_are_audited(
    app: Any, client: Any, referral_id: str
) -> None:
    posted = responses.post(UNIT_BASE, json=ANSWER, status=200)
    client.post(f"/iop/referrals/{referral_id}/accept", json={"planned_admission": "2026-02-09"})
    assert [r.status for r in rows(app, record_kind="referral")] == ["pending"]
    run_worker(app)
    assert posted.call_count == 1
    [event] = audit_events(app)
    referral = client.get(f"/iop/referrals/{referral_id}").get_json()
    patient = next(r for r in referral["fhir"] if r.startswith("Patient/"))
    assert [e["what"]["reference"] for e in event["entity"]] == [patient, f"Task/{referral_id}"]
    assert event["agent"][1]["who"] == {"reference": "Organization/st-joseph-detox"}


@responses.activate
def test_the_admission_goes_to_the_referring_unit_only_with_consent_and_carries_it(
    app: Any, client: Any, referral_id: str
) -> None:
    posted = responses.post(UNIT_BASE, json=ANSWER, status=200)
    client.post(f"/iop/referrals/{referral_id}/accept", json={"planned_admission": "2026-02-09"})
    admitted = client.post(f"/iop/referrals/{referral_id}/admit", json={"enrollment": ADMISSION}).get_json()
    accepted_row, admitted_row = rows(app, record_kind="referral")
    assert (accepted_row.status, admitted_row.status) == ("pending", "blocked")
    run_worker(app)
    assert posted.call_count == 1  # the answer before admission only

    consent = client.post("/iop/consents", json=consent_payload(admitted["enrollment_id"], "st-joseph-detox"))
    assert consent.status_code == 201, consent.get_json()
    statuses = [r.status for r in rows(app, record_kind="referral")]
    assert statuses == ["delivered", "superseded", "pending"]
    run_worker(app)

    assert posted.call_count == 2
    sent = orjson.loads(responses.calls[1].request.body)
    assert types(sent) == ["Task", "Consent"]
    task, carried = (e["resource"] for e in sent["entry"])
    assert task["status"] == "completed"
    assert carried["patient"] == task["for"]  # the unit's own patient, not a Patient of ours
    events = audit_events(app)
    assert len(events) == 2
    admission_event = next(e for e in events if any(x["what"]["reference"].startswith("Consent/") for x in e["entity"]))
    assert admission_event["entity"][0]["what"]["reference"] == patient_of(client, admitted["enrollment_id"])
