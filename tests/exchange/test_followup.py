"""The closed loop of a transition (exchange/followup.py): what the aftercare partner reports on its copy of the
referral Task (status, BSeR business status, status reason, outputs) comes back onto our Task, one version per
change and none when nothing changed, and `GET /iop/discharges/{id}` shows every step as the transition's timeline."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from iop_fhir.exchange import followup
from iop_fhir.mapping import ids
from iop_fhir.r4.instants import now_us

CONTRACT = Path(__file__).resolve().parents[3] / "shared" / "contract"
PARTNER_BASE = "https://aftercare.example.org/fhir"
BSER = "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS"


def contract(kind: str, enrollment_id: str | None = None) -> dict[str, Any]:
    text = (CONTRACT / f"{kind}.json").read_text(encoding="utf-8")
    payload: dict[str, Any] = json.loads(text.replace("{{enrollment_id}}", enrollment_id or ""))
    return payload


class Partner:
    """The aftercare partner's FHIR server as the follow-up sees it: its copy of our Task, and its Appointments."""

    def __init__(self) -> None:
        self.base_url = PARTNER_BASE
        self.task: dict[str, Any] | None = None
        self.appointments: dict[str, dict[str, Any]] = {}
        self.reads: list[str] = []

    def search(self, res_type: str, params: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
        assert res_type == "Task"
        if self.task is not None and params == [("identifier", self.identifier)]:
            yield copy.deepcopy(self.task)

    def read(self, path: str) -> dict[str, Any]:
        self.reads.append(path)
        return copy.deepcopy(self.appointments[path])

    def report(self, status: str, code: str, display: str, **more: Any) -> None:
        assert self.task is not None
        self.task.update(status=status, businessStatus={"coding": [{"system": BSER, "code": code, "display": display}]})
        self.task.update(more)


@pytest.fixture
def partner() -> Partner:
    return Partner()


@pytest.fixture
def discharge(app: Any, client: Any, partner: Partner) -> dict[str, Any]:
    """A discharge with a referral whose package the partner took: its Task as we sent it is now the partner's."""
    assert client.post("/iop/partners", json=contract("partner")).status_code == 201
    enrollment_id = client.post("/iop/enrollments", json=contract("enrollment")).get_json()["id"]
    assert client.post("/iop/treatment-plans", json=contract("treatment-plan", enrollment_id)).status_code == 201
    consent = contract("consent", enrollment_id)
    del consent["expires_on"]
    assert client.post("/iop/consents", json=consent).status_code == 201
    body: dict[str, Any] = client.post("/iop/discharges", json=contract("discharge", enrollment_id)).get_json()
    store = app.extensions["iop_fhir.store"]
    [row] = store.claim("test-worker", now_us(), 60, 10)
    assert store.delivered(row.id, "test-worker", now_us(), {"entries": []})
    task_ref = next(r for r in body["fhir"] if r.startswith("Task/"))
    ours = client.get(f"/fhir/{task_ref}").get_json()
    partner.task = {k: v for k, v in ours.items() if k != "meta"} | {"id": "partner-task-1"}
    identifier = ids.identifier_value("discharge", body["id"], "referral-task")
    partner.identifier = f"{ids.RECORD_SYSTEM}|{identifier}"  # type: ignore[attr-defined]
    body["task_ref"] = task_ref
    return body


def follow(app: Any, partner: Partner) -> int:
    return followup.follow(app.extensions["iop_fhir.repository"], app.config["IOP_FHIR"], lambda _p, _s: partner)


def our_task(client: Any, discharge: dict[str, Any]) -> dict[str, Any]:
    task: dict[str, Any] = client.get(f"/fhir/{discharge['task_ref']}").get_json()
    return task


def timeline(client: Any, discharge: dict[str, Any]) -> list[dict[str, Any]]:
    shown: list[dict[str, Any]] = client.get(f"/iop/discharges/{discharge['id']}").get_json()["transition"]["timeline"]
    return shown


def test_accepted_scheduled_and_attended_come_back_one_version_each_and_show_as_the_timeline(
    app: Any, client: Any, partner: Partner, discharge: dict[str, Any]
) -> None:
    assert [s["event"] for s in timeline(client, discharge)] == ["created", "sent"]

    partner.report("accepted", "3.0", "Service Request Accepted")
    assert follow(app, partner) == 1
    task = our_task(client, discharge)
    assert (task["status"], task["businessStatus"]["coding"][0]["code"], task["meta"]["versionId"]) == (
        "accepted",
        "3.0",
        "2",
    )

    partner.appointments["Appointment/appt-7"] = {"resourceType": "Appointment", "start": "2026-04-02T10:00:00-04:00"}
    scheduled = [{"type": {"text": "appointment scheduled"}, "valueReference": {"reference": "Appointment/appt-7"}}]
    partner.report("in-progress", "5.1.1", "Service Request Event Scheduled", output=scheduled)
    assert follow(app, partner) == 1
    task = our_task(client, discharge)
    assert (task["status"], task["businessStatus"]["coding"][0]["code"], task["meta"]["versionId"]) == (
        "in-progress",
        "5.1.1",
        "3",
    )
    # The partner's reference names its own server; the Appointment's start is kept with it.
    assert task["output"] == [
        {
            "type": {"text": "appointment scheduled"},
            "valueReference": {
                "reference": f"{PARTNER_BASE}/Appointment/appt-7",
                "display": "Appointment on 2026-04-02T10:00:00-04:00",
            },
        }
    ]

    attended = [*scheduled, {"type": {"text": "first visit attended"}, "valueDateTime": "2026-04-02T10:05:00-04:00"}]
    partner.report("completed", "5.1.4", "Service Request Event Completed", output=attended)
    assert follow(app, partner) == 1
    assert our_task(client, discharge)["meta"]["versionId"] == "4"

    steps = timeline(client, discharge)
    assert [s["event"] for s in steps] == ["created", "sent", "accepted", "scheduled", "first-visit-attended"]
    assert [s["status"] for s in steps] == ["requested", "requested", "accepted", "in-progress", "completed"]
    assert [(s["business_status"] or {}).get("code") for s in steps] == ["2.0", None, "3.0", "5.1.1", "5.1.4"]
    assert steps[0]["business_status"] == {"code": "2.0", "display": "Service Request Created"}
    assert steps[1]["business_status"] is None and "passaic-valley-recovery" in steps[1]["detail"]
    assert steps[3]["scheduled_for"] == "2026-04-02T10:00:00-04:00"
    assert steps[3]["detail"] == "first visit scheduled for 2026-04-02T10:00:00-04:00"
    assert steps[4]["detail"] == "first visit attended"
    assert [s["at"] for s in steps] == sorted(s["at"] for s in steps)
    # A completed Task is final: it is no longer followed.
    partner.report("cancelled", "6.0", "Service Request Fulfillment Cancelled")
    assert follow(app, partner) == 0


def test_an_unchanged_partner_task_makes_no_new_version(
    app: Any, client: Any, partner: Partner, discharge: dict[str, Any]
) -> None:
    assert follow(app, partner) == 0
    assert our_task(client, discharge)["meta"]["versionId"] == "1"
    partner.report("accepted", "3.0", "Service Request Accepted")
    assert follow(app, partner) == 1
    assert follow(app, partner) == 0
    # a partner that only touches lastModified changes nothing we show
    assert partner.task is not None
    partner.task["lastModified"] = "2026-03-29T09:00:00Z"
    assert follow(app, partner) == 0
    assert our_task(client, discharge)["meta"]["versionId"] == "2"
    history = client.get(f"/fhir/{discharge['task_ref']}/_history").get_json()
    assert history["total"] == 2
    assert [s["event"] for s in timeline(client, discharge)] == ["created", "sent", "accepted"]


def test_a_declined_referral_shows_the_partners_reason(
    app: Any, client: Any, partner: Partner, discharge: dict[str, Any]
) -> None:
    partner.report("rejected", "4.0", "Service Request Declined", statusReason={"text": "No opening before May"})
    assert follow(app, partner) == 1
    task = our_task(client, discharge)
    assert task["statusReason"] == {"text": "No opening before May"}
    last = timeline(client, discharge)[-1]
    assert (last["event"], last["status"], last["business_status"]["code"]) == ("declined", "rejected", "4.0")
    assert last["detail"] == "declined by the partner: No opening before May"
    transition = client.get(f"/iop/discharges/{discharge['id']}").get_json()["transition"]
    assert transition["task"]["status_reason"] == "No opening before May"
    assert transition["overdue"] is False


def test_a_received_task_and_a_reason_removed_by_the_partner_are_followed(
    app: Any, client: Any, partner: Partner, discharge: dict[str, Any]
) -> None:
    assert partner.task is not None
    partner.task.update(status="received", statusReason={"text": "awaiting intake review"})
    assert follow(app, partner) == 1
    partner.task.pop("statusReason")
    partner.report("accepted", "3.0", "Service Request Accepted")
    assert follow(app, partner) == 1
    assert "statusReason" not in our_task(client, discharge)
    steps = timeline(client, discharge)
    assert [s["event"] for s in steps] == ["created", "sent", "received", "accepted"]
    assert steps[2]["detail"] == "received by the partner: awaiting intake review"


def test_a_scheduled_date_is_read_from_a_date_time_a_period_or_a_followed_appointment() -> None:
    assert followup.scheduled_for([{"type": {"text": "x"}, "valueDateTime": "2026-04-02"}]) == "2026-04-02"
    assert followup.scheduled_for([{"valuePeriod": {"start": "2026-04-03T09:00:00Z"}}]) == "2026-04-03T09:00:00Z"
    reference = {"valueReference": {"reference": "https://x/Appointment/1", "display": "Appointment on 2026-04-04"}}
    assert followup.scheduled_for([reference]) == "2026-04-04"
    assert followup.scheduled_for([{"valueReference": {"reference": "https://x/Appointment/1"}}]) is None
    assert followup.scheduled_for(None) is None


def test_the_followed_task_is_valid_against_our_profile(
    app: Any, client: Any, partner: Partner, discharge: dict[str, Any]
) -> None:
    partner.report(
        "in-progress",
        "5.1.1",
        "Service Request Event Scheduled",
        output=[{"type": {"text": "appointment"}, "valuePeriod": {"start": "2026-04-02T10:00:00Z"}}],
    )
    assert follow(app, partner) == 1
    store = app.extensions["iop_fhir.store"]
    res_type, res_id = discharge["task_ref"].split("/")
    stored = orjson.loads(store.read(res_type, res_id).content)
    assert stored["output"][0]["valuePeriod"] == {"start": "2026-04-02T10:00:00Z"}
    assert timeline(client, discharge)[-1]["scheduled_for"] == "2026-04-02T10:00:00Z"


def test_a_corrected_discharge_after_acceptance_is_not_overdue_and_keeps_one_accepted_step(
    app: Any, client: Any, partner: Partner, discharge: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from iop_fhir.exchange import transitions

    partner.report("accepted", "3.0", "Service Request Accepted")
    assert follow(app, partner) == 1
    corrected = client.get(f"/iop/discharges/{discharge['id']}").get_json()
    payload = {k: v for k, v in corrected.items() if k not in ("id", "fhir", "meta", "transition", "warnings")}
    payload["summary"] = "Completed 12 weeks (corrected)."
    assert client.put(f"/iop/discharges/{discharge['id']}", json=payload).status_code == 200
    later = now_us() + 30 * followup.DAY_US
    monkeypatch.setattr(transitions, "now_us", lambda: later)
    shown = client.get(f"/iop/discharges/{discharge['id']}").get_json()["transition"]
    assert shown["overdue"] is False and "accept_by" not in shown
    assert follow(app, partner) == 1  # the partner's state comes back onto the re-mapped Task
    events = [s["event"] for s in timeline(client, discharge)]
    assert events.count("accepted") == 1


# -- the timelines of many discharges at once (the outcomes of a period) ---------------------------------------------


def discharged(client: Any, mrn: str, *, referral: bool = True) -> dict[str, Any]:
    """A discharge of a patient of its own (``mrn``), with a referral to the partner unless not ``referral``."""
    enrollment = contract("enrollment")
    enrollment["patient"]["identifiers"][0]["value"] = mrn
    enrollment_id = client.post("/iop/enrollments", json=enrollment).get_json()["id"]
    assert client.post("/iop/treatment-plans", json=contract("treatment-plan", enrollment_id)).status_code == 201
    consent = contract("consent", enrollment_id)
    del consent["expires_on"]
    assert client.post("/iop/consents", json=consent).status_code == 201
    payload = contract("discharge", enrollment_id)
    if not referral:
        del payload["referral"]
    response = client.post("/iop/discharges", json=payload)
    assert response.status_code == 201
    body: dict[str, Any] = response.get_json()
    return body


def answer(app: Any, discharge: dict[str, Any], status: str, code: str, display: str, **more: Any) -> None:
    """A new version of our Task with what the partner reported, as following its Task writes it."""
    store, repository = app.extensions["iop_fhir.store"], app.extensions["iop_fhir.repository"]
    res_type, res_id = next(r for r in discharge["fhir"] if r.startswith("Task/")).split("/", 1)
    with store.write() as tx:
        current = tx.current(res_type, res_id)
        task = orjson.loads(current.content)
        task.update(status=status, businessStatus={"coding": [{"system": BSER, "code": code, "display": display}]})
        task.update(more)
        repository.update_in(tx, res_type, res_id, task)


def test_the_timelines_of_many_discharges_read_at_once_equal_each_ones_timeline(
    app: Any, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert client.post("/iop/partners", json=contract("partner")).status_code == 201
    sent, accepted, rejected, completed, unsent = (discharged(client, f"MRN-{n}") for n in range(5))
    without_referral = discharged(client, "MRN-5", referral=False)
    store = app.extensions["iop_fhir.store"]
    for row in store.claim("test-worker", now_us(), 60, 50):
        if row.record_id != unsent["id"]:
            assert store.delivered(row.id, "test-worker", now_us(), {"entries": []})
    answer(app, accepted, "accepted", "3.0", "Service Request Accepted")
    scheduled = [{"type": {"text": "first visit"}, "valueDateTime": "2026-04-02T10:00:00Z"}]
    answer(app, accepted, "in-progress", "5.1.1", "Appointment Scheduled", output=scheduled)
    answer(app, accepted, "in-progress", "5.1.1", "Appointment Scheduled", output=scheduled)  # nothing new
    answer(app, rejected, "rejected", "4.0", "Service Request Declined", statusReason={"text": "no capacity"})
    answer(app, completed, "accepted", "3.0", "Service Request Accepted")
    answer(app, completed, "completed", "7.0", "Service Request Fulfilled")
    records = [store.record("discharge", d["id"]) for d in (sent, accepted, rejected, completed, unsent)]
    records.append(store.record("discharge", without_referral["id"]))
    each = {r.id: followup.timeline(r, store, sent=False) for r in records}

    def one_by_one(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a Task's history was read on its own")

    monkeypatch.setattr(store, "history", one_by_one)
    batched = followup.timelines(records, store)
    assert batched == each
    events = {d: [s["event"] for s in steps] for d, steps in batched.items()}
    assert events == {
        sent["id"]: ["created"],
        accepted["id"]: ["created", "accepted", "scheduled"],
        rejected["id"]: ["created", "declined"],
        completed["id"]: ["created", "accepted", "completed"],
        unsent["id"]: ["created"],
        without_referral["id"]: [],
    }
    assert batched[rejected["id"]][-1]["detail"] == "declined by the partner: no capacity"
    assert batched[accepted["id"]][-1]["scheduled_for"] == "2026-04-02T10:00:00Z"
