"""The outbox worker on both databases: what each outcome of a delivery does to its row, the default delivery
through PartnerClient, SIGTERM, a worker killed mid-delivery, and the `iop-fhir worker` command."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import responses

from iop_fhir.cli import main
from iop_fhir.config import Settings
from iop_fhir.exchange import outbox, worker
from iop_fhir.exchange.client import DeliveryError
from iop_fhir.r4.instants import now_us
from iop_fhir.runtime import repository_for, run_worker
from iop_fhir.store.base import Delivery, StoredRecord
from iop_fhir.store.sql import SqlStore

SECOND = 1_000_000
BASE = "http://fhir.aftercare.example/R4"
PARTNER = {
    "id": "passaic-valley-recovery",
    "kind": "aftercare-provider",
    "name": "Synthetic Aftercare Services",
    "fhir_base_url": BASE,
    "auth": {"type": "none"},
}
PHI = "Synthetic-Okafor"
BUNDLE = {
    "resourceType": "Bundle",
    "type": "transaction",
    "entry": [
        {
            "fullUrl": "urn:uuid:5b7f1c3e-0d4e-4c1a-9a53-3f7c2d7e9a10",
            "resource": {"resourceType": "Patient", "name": [{"family": PHI}]},
            "request": {"method": "PUT", "url": "Patient?identifier=urn:oid:2.16.840.1.113883.19.5|MRN-000123"},
        }
    ],
}
RESPONSE = {
    "resourceType": "Bundle",
    "type": "transaction-response",
    "entry": [
        {
            "resource": {"resourceType": "Patient", "id": "p9", "name": [{"family": PHI}]},
            "response": {"status": "201 Created", "location": "Patient/p9/_history/1", "etag": 'W/"1"'},
        }
    ],
}
OUTCOME = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "required", "diagnostics": "Patient.gender is required"}],
}


class Clock:
    def __init__(self) -> None:
        self.now = now_us()

    def __call__(self) -> int:
        return self.now


class Partner:
    """A fake deliver: answers from a script, one item per call (an answer or an exception), and counts calls."""

    def __init__(self, *script: Any) -> None:
        self.script = list(script)
        self.calls: list[str] = []

    def __call__(self, row: Delivery, partner: dict[str, Any]) -> dict[str, Any] | None:
        self.calls.append(row.id)
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, BaseException):
            raise step
        result: dict[str, Any] | None = step
        return result


@pytest.fixture
def store(db_url: str) -> Iterator[SqlStore]:
    store = SqlStore(db_url)
    yield store
    store.close()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(worker, "now_us", clock)
    return clock


def save_partner(store: SqlStore, content: dict[str, Any] = PARTNER, status: str = "active") -> None:
    with store.write() as tx:
        tx.save_record(StoredRecord("partner", content["id"], None, status, 1, content, [], 1, 1))


def add(store: SqlStore, now: int, *, partner: str = "passaic-valley-recovery", payload: Any = None) -> str:
    with store.write() as tx:
        kind = "bundle" if payload is None else "notification"
        return outbox.enqueue(tx, partner, "discharge", "d1", kind, payload or outbox.bundle_payload(BUNDLE), now=now)


def run_once(store: SqlStore, deliver: Any = None, **settings: Any) -> int:
    return run_worker(Settings(database_url=store.url, **settings), once=True, deliver=deliver, store=store)


def row(store: SqlStore, delivery_id: str) -> Delivery:
    found = store.delivery(delivery_id)
    assert found is not None
    return found


def test_a_delivered_row_keeps_the_partner_statuses_and_locations_but_not_the_resources(
    store: SqlStore, clock: Clock
) -> None:
    save_partner(store)
    delivery_id = add(store, clock.now)
    assert run_once(store, Partner(RESPONSE)) == 0
    done = row(store, delivery_id)
    assert (done.status, done.attempts, done.delivered_at, done.last_error) == ("delivered", 1, clock.now, None)
    assert done.response == {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [{"status": "201 Created", "location": "Patient/p9/_history/1", "etag": 'W/"1"'}],
    }


def test_a_retryable_failure_is_tried_again_after_the_backoff_with_the_error_kept(
    store: SqlStore, clock: Clock
) -> None:
    save_partner(store)
    delivery_id = add(store, clock.now)
    error = DeliveryError(f"POST {BASE} answered 503 Service Unavailable", retryable=True, status=503)
    partner = Partner(error, RESPONSE)
    run_once(store, partner)
    failed = row(store, delivery_id)
    assert (failed.status, failed.attempts, failed.last_error) == ("pending", 1, error.to_json())
    assert clock.now <= failed.next_attempt_at <= clock.now + 2 * SECOND
    clock.now = failed.next_attempt_at
    run_once(store, partner)
    assert (row(store, delivery_id).status, row(store, delivery_id).attempts) == ("delivered", 2)
    assert partner.calls == [delivery_id, delivery_id]


def test_a_retry_after_from_the_partner_delays_the_next_attempt(store: SqlStore, clock: Clock) -> None:
    save_partner(store)
    delivery_id = add(store, clock.now)
    run_once(store, Partner(DeliveryError("answered 429", retryable=True, status=429, retry_after=120.0)))
    assert row(store, delivery_id).next_attempt_at >= clock.now + 120 * SECOND
    assert row(store, delivery_id).last_error["retry_after"] == 120.0  # type: ignore[index]


def test_a_permanent_failure_is_dead_at_once_with_the_partner_outcome_kept(store: SqlStore, clock: Clock) -> None:
    save_partner(store)
    delivery_id = add(store, clock.now)
    error = DeliveryError("answered 422 (OperationOutcome: required)", retryable=False, status=422, outcome=OUTCOME)
    partner = Partner(error)
    run_once(store, partner)
    dead = row(store, delivery_id)
    assert (dead.status, dead.attempts) == ("dead", 1)
    assert dead.last_error == error.to_json()
    assert dead.last_error["outcome"] == OUTCOME  # type: ignore[index]
    clock.now += 10 * 86400 * SECOND
    run_once(store, partner)
    assert partner.calls == [delivery_id]
    assert [d.id for d in store.deliveries(status="dead")[0]] == [delivery_id]


def test_a_row_failing_every_time_is_dead_after_the_configured_attempts(store: SqlStore, clock: Clock) -> None:
    save_partner(store)
    delivery_id = add(store, clock.now)
    partner = Partner(DeliveryError("timed out (ReadTimeout)", retryable=True))
    for _ in range(5):
        run_once(store, partner, outbox_max_attempts=3)
        clock.now += 3600 * SECOND
    dead = row(store, delivery_id)
    assert (dead.status, dead.attempts, len(partner.calls)) == ("dead", 3, 3)
    assert dead.last_error is not None and dead.last_error["message"] == "timed out (ReadTimeout)"


def test_a_row_whose_every_attempt_killed_the_worker_is_dead_after_the_configured_attempts(
    store: SqlStore, clock: Clock
) -> None:
    save_partner(store)
    delivery_id = add(store, clock.now)
    for _ in range(3):  # three workers claimed it and died before recording an outcome
        assert [r.id for r in store.claim("doomed", clock.now, 1, 10)] == [delivery_id]
        clock.now += 2 * SECOND
    partner = Partner(None)
    run_once(store, partner, outbox_max_attempts=3)
    dead = row(store, delivery_id)
    assert (dead.status, dead.attempts, len(partner.calls)) == ("dead", 4, 0)
    assert dead.last_error is not None and "never finished" in dead.last_error["message"]


def test_a_row_for_an_unknown_partner_is_dead_with_a_message_naming_it(store: SqlStore, clock: Clock) -> None:
    delivery_id = add(store, clock.now, partner="nobody-here")
    partner = Partner(RESPONSE)
    run_once(store, partner)
    dead = row(store, delivery_id)
    assert dead.status == "dead"
    assert dead.last_error is not None
    assert dead.last_error["message"] == "partner nobody-here is not known; create it at /iop/partners, then retry"
    assert dead.last_error["retryable"] is False
    assert partner.calls == []


def test_a_row_for_an_inactive_partner_is_dead_with_a_message_naming_it(store: SqlStore, clock: Clock) -> None:
    save_partner(store, {**PARTNER, "active": False})
    delivery_id = add(store, clock.now)
    partner = Partner(RESPONSE)
    run_once(store, partner)
    dead = row(store, delivery_id)
    assert dead.status == "dead"
    assert dead.last_error is not None
    assert dead.last_error["message"] == "partner passaic-valley-recovery is inactive; activate it, then retry"
    assert partner.calls == []


def test_an_unexpected_error_is_retried_and_only_its_type_is_stored_or_logged(
    store: SqlStore, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    save_partner(store)
    delivery_id = add(store, clock.now)
    with caplog.at_level(logging.DEBUG):
        run_once(store, Partner(ValueError(f"cannot map patient {PHI}, born 1990-01-01")))
    failed = row(store, delivery_id)
    assert failed.status == "pending"
    assert failed.last_error == {
        "status": None,
        "retryable": True,
        "message": "unexpected ValueError in the worker",
        "outcome": None,
        "retry_after": None,
    }
    assert "ValueError" in caplog.text
    assert PHI not in caplog.text and "1990" not in caplog.text


def test_a_row_whose_lease_passed_to_another_worker_is_not_delivered_again(store: SqlStore, clock: Clock) -> None:
    save_partner(store)
    delivery_id = add(store, clock.now)
    (stale,) = store.claim("slow-worker", clock.now, 60, 10)
    store.claim("other-worker", clock.now + 61 * SECOND, 60, 10)
    clock.now += 62 * SECOND
    partner = Partner(RESPONSE)
    late = worker.Worker(
        store,
        Settings(),
        deliver=partner,
        lease=60,
        worker_id="slow-worker",
        repository=repository_for(Settings(), store),
    )
    late.process(stale)
    assert partner.calls == []
    assert (row(store, delivery_id).status, row(store, delivery_id).leased_by) == ("delivering", "other-worker")


def test_a_row_reached_late_in_a_batch_has_its_lease_renewed_before_delivery(store: SqlStore, clock: Clock) -> None:
    save_partner(store)
    delivery_id = add(store, clock.now)
    (claimed,) = store.claim("w1", clock.now, 60, 10)
    clock.now += 40 * SECOND  # earlier rows of the batch took 40 of the 60 s
    renewed: list[int | None] = []

    def deliver(delivery: Delivery, partner: dict[str, Any]) -> dict[str, Any]:
        renewed.append(row(store, delivery.id).lease_until)
        return RESPONSE

    worker.Worker(
        store, Settings(), deliver=deliver, lease=60, worker_id="w1", repository=repository_for(Settings(), store)
    ).process(claimed)
    assert renewed == [clock.now + 60 * SECOND]
    assert row(store, delivery_id).status == "delivered"


def test_once_with_nothing_due_returns_0_without_delivering(store: SqlStore, clock: Clock) -> None:
    save_partner(store)
    add(store, clock.now + 3600 * SECOND)
    partner = Partner(RESPONSE)
    assert run_once(store, partner) == 0
    assert partner.calls == []


# -- the default deliver: PartnerClient ---------------------------------------------------------------------------


@responses.activate
def test_the_default_deliver_posts_a_bundle_to_the_partner_base(store: SqlStore, clock: Clock) -> None:
    save_partner(store)
    delivery_id = add(store, clock.now)
    posted = responses.post(BASE, json=RESPONSE, status=200)
    run_once(store)
    assert posted.call_count == 1
    assert responses.calls[0].request.headers["Content-Type"] == "application/fhir+json"
    assert row(store, delivery_id).status == "delivered"
    assert row(store, delivery_id).response["entry"][0]["location"] == "Patient/p9/_history/1"  # type: ignore[index]


@responses.activate
def test_the_default_deliver_puts_a_notification_to_its_url(store: SqlStore, clock: Clock) -> None:
    save_partner(store)
    task = {"resourceType": "Task", "id": "t1", "status": "accepted", "intent": "order"}
    delivery_id = add(store, clock.now, payload={"method": "PUT", "url": "Task/t1", "body": task})
    put = responses.put(f"{BASE}/Task/t1", json={**task, "meta": {"versionId": "3"}}, status=200)
    run_once(store)
    assert put.call_count == 1
    assert row(store, delivery_id).response == {"resourceType": "Task", "id": "t1", "versionId": "3"}


def test_a_notification_the_partner_client_cannot_send_is_dead_with_a_message(store: SqlStore, clock: Clock) -> None:
    save_partner(store)
    payload = {"method": "POST", "url": "https://hook.example/notify?mrn=MRN-000123", "body": None}
    delivery_id = add(store, clock.now, payload=payload)
    run_once(store)
    dead = row(store, delivery_id)
    assert dead.status == "dead"
    assert dead.last_error is not None
    assert dead.last_error["message"] == (
        "a notification delivery POST to 'https://hook.example/notify' is not supported by the partner client"
    )


@responses.activate
def test_a_partner_answering_422_with_an_outcome_makes_the_row_dead_with_it(store: SqlStore, clock: Clock) -> None:
    save_partner(store)
    delivery_id = add(store, clock.now)
    responses.post(BASE, json=OUTCOME, status=422)
    run_once(store)
    dead = row(store, delivery_id)
    assert dead.status == "dead"
    assert dead.last_error is not None
    assert (dead.last_error["status"], dead.last_error["outcome"]) == (422, OUTCOME)


@responses.activate
def test_a_partner_answering_503_with_retry_after_is_retried_after_it(store: SqlStore, clock: Clock) -> None:
    save_partner(store)
    delivery_id = add(store, clock.now)
    responses.post(BASE, status=503, headers={"Retry-After": "90"})
    run_once(store)
    failed = row(store, delivery_id)
    assert (failed.status, failed.next_attempt_at >= clock.now + 90 * SECOND) == ("pending", True)
    assert failed.last_error is not None and failed.last_error["status"] == 503


@responses.activate
def test_the_default_deliver_reuses_a_partner_client_until_the_partner_changes_or_answers_401(
    store: SqlStore, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from iop_fhir.exchange import partners as client_module

    made: list[str] = []
    real_client_for = client_module.client_for

    def counting_client_for(partner: dict[str, Any], settings: Settings, **kwargs: Any) -> Any:
        made.append(partner["name"])
        return real_client_for(partner, settings, **kwargs)

    monkeypatch.setattr(client_module, "client_for", counting_client_for)
    responses.post(BASE, json=RESPONSE)
    deliver = worker.PartnerDeliverer(Settings())
    for _ in range(3):
        deliver(row(store, add(store, clock.now)), PARTNER)
    assert made == [PARTNER["name"]]
    deliver(row(store, add(store, clock.now)), {**PARTNER, "name": "Renamed Aftercare"})
    assert made == [PARTNER["name"], "Renamed Aftercare"]

    responses.replace(responses.POST, BASE, status=401)
    with pytest.raises(DeliveryError):
        deliver(row(store, add(store, clock.now)), PARTNER)
    responses.replace(responses.POST, BASE, json=RESPONSE)
    deliver(row(store, add(store, clock.now)), PARTNER)
    assert made == [PARTNER["name"], "Renamed Aftercare", PARTNER["name"], PARTNER["name"]]


# -- signals and crashes (separate processes) ---------------------------------------------------------------------


def _slow_worker(url: str, lease: float, hold: float, started: Any) -> None:
    """A worker whose partner takes ``hold`` seconds per delivery; ``started`` is set once the first is under way."""
    import time

    def deliver(delivery: Delivery, partner: dict[str, Any]) -> dict[str, Any]:
        started.set()
        time.sleep(hold)
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": []}

    code = run_worker(Settings(database_url=url), poll=0.05, batch=3, lease=lease, deliver=deliver)
    raise SystemExit(code)


def test_sigterm_finishes_the_current_delivery_gives_back_the_rest_and_exits_0(store: SqlStore, db_url: str) -> None:
    save_partner(store)
    start = now_us()
    ids = [add(store, start + i) for i in range(3)]
    ctx = multiprocessing.get_context("spawn")
    started = ctx.Event()
    process = ctx.Process(target=_slow_worker, args=(db_url, 60.0, 1.0, started))
    process.start()
    assert started.wait(120)
    assert process.pid is not None
    os.kill(process.pid, signal.SIGTERM)
    process.join(60)
    assert process.exitcode == 0
    rows = [row(store, i) for i in ids]
    assert [(r.status, r.attempts) for r in rows] == [("delivered", 1), ("pending", 0), ("pending", 0)]
    assert all(r.lease_until is None for r in rows)


def test_a_worker_killed_mid_delivery_loses_nothing_another_takes_the_row_after_the_lease(
    store: SqlStore, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_partner(store)
    delivery_id = add(store, now_us())
    ctx = multiprocessing.get_context("spawn")
    started = ctx.Event()
    process = ctx.Process(target=_slow_worker, args=(db_url, 30.0, 600.0, started))
    process.start()
    assert started.wait(120)
    assert process.pid is not None
    os.kill(process.pid, signal.SIGKILL)
    process.join(60)
    assert process.exitcode == -signal.SIGKILL
    assert row(store, delivery_id).status == "delivering"

    partner = Partner(RESPONSE)
    run_once(store, partner)  # the lease still runs: nobody else takes the row
    assert partner.calls == []
    monkeypatch.setattr(worker, "now_us", lambda: now_us() + 31 * SECOND)
    run_once(store, partner)
    done = row(store, delivery_id)
    assert partner.calls == [delivery_id]
    assert (done.status, done.attempts) == ("delivered", 2)


# -- the command ----------------------------------------------------------------------------------------------


def test_the_worker_command_with_once_delivers_what_is_due_and_exits_0(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_partner(store)
    delivery_id = add(store, now_us())
    monkeypatch.setenv("IOP_FHIR_DATABASE_URL", store.url)
    with responses.RequestsMock() as mock:
        mock.post(BASE, json=RESPONSE)
        assert main(["worker", "--once", "--batch", "5", "--poll", "0.1", "--lease", "30"]) == 0
    assert row(store, delivery_id).status == "delivered"


@pytest.mark.parametrize("arguments", [["--batch", "0"], ["--poll", "-1"], ["--lease", "soon"]])
def test_the_worker_command_refuses_bad_options(arguments: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["worker", *arguments])
    assert exit_info.value.code == 2
    assert arguments[0] in capsys.readouterr().err


def test_the_worker_pulls_from_hospitals_and_follows_transitions_when_scheduled(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from iop_fhir.exchange import followup, sync

    calls: list[str] = []
    monkeypatch.setattr(sync, "sync_all", lambda *_a, **_k: calls.append("sync") or sync.SyncReport())
    monkeypatch.setattr(followup, "follow", lambda *_a, **_k: calls.append("follow") or 0)
    settings = Settings(database_url=store.url)
    assert run_worker(settings, once=True, store=store, sync_every=60, follow_every=60) == 0
    assert sorted(calls) == ["follow", "sync"]
    calls.clear()
    assert run_worker(settings, once=True, store=store) == 0
    assert calls == []
