"""The outbox: the retry policy (pure), enqueue inside a write transaction, and the store's claim, lease and
completion rules on both databases, with threads and with processes."""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from iop_fhir.config import Settings
from iop_fhir.exchange import outbox
from iop_fhir.exchange.outbox import backoff_ceiling, next_attempt
from iop_fhir.r4.instants import now_us
from iop_fhir.runtime import run_worker
from iop_fhir.store.base import Delivery, StoredRecord
from iop_fhir.store.sql import SqlStore

NOW = 1_800_000_000_000_000  # µs
SECOND = 1_000_000
BUNDLE = {
    "resourceType": "Bundle",
    "type": "transaction",
    "entry": [
        {
            "fullUrl": "urn:uuid:5b7f1c3e-0d4e-4c1a-9a53-3f7c2d7e9a10",
            "resource": {"resourceType": "Patient", "name": [{"family": "Synthetic-Okafor"}]},
            "request": {"method": "PUT", "url": "Patient?identifier=urn:oid:2.16.840.1.113883.19.5|MRN-000123"},
        },
        {
            "resource": {"resourceType": "CarePlan", "status": "active"},
            "request": {"method": "PUT", "url": "CarePlan?identifier=x|y"},
        },
    ],
}


class Fixed:
    """A jitter source that always draws the same point of the range: 0.0 = its low end, 1.0 = its high end."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fraction


# -- policy (pure) ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempts", "ceiling"),
    [(1, 2), (2, 4), (3, 8), (4, 16), (7, 128), (11, 2048), (12, 3600), (13, 3600), (100, 3600), (10**6, 3600)],
)
def test_the_backoff_ceiling_doubles_from_two_seconds_and_is_capped_at_an_hour(attempts: int, ceiling: int) -> None:
    assert backoff_ceiling(attempts) == ceiling


@pytest.mark.parametrize("attempts", [1, 2, 5, 12])
def test_full_jitter_draws_the_wait_between_zero_and_the_ceiling(attempts: int) -> None:
    ceiling = int(backoff_ceiling(attempts) * SECOND)
    assert next_attempt(attempts, NOW, None, Fixed(0.0), max_attempts=20) == NOW
    assert next_attempt(attempts, NOW, None, Fixed(1.0), max_attempts=20) == NOW + ceiling
    rng = random.Random(4)
    waits = [next_attempt(attempts, NOW, None, rng, max_attempts=20) for _ in range(2000)]
    offsets = [w - NOW for w in waits if w is not None]
    assert len(offsets) == 2000
    assert all(0 <= o <= ceiling for o in offsets)
    # Spread over the whole range, not clustered at the ceiling as plain exponential backoff would be.
    assert min(offsets) < ceiling * 0.05
    assert max(offsets) > ceiling * 0.95


def test_a_retry_after_longer_than_the_drawn_wait_wins() -> None:
    assert next_attempt(1, NOW, 30.0, Fixed(1.0)) == NOW + 30 * SECOND
    assert next_attempt(12, NOW, 7200.0, Fixed(0.5), max_attempts=20) == NOW + 7200 * SECOND  # past the backoff cap too


def test_a_retry_after_shorter_than_the_drawn_wait_does_not_shorten_it() -> None:
    assert next_attempt(3, NOW, 1.0, Fixed(1.0)) == NOW + 8 * SECOND
    assert next_attempt(3, NOW, 0.0, Fixed(0.5)) == NOW + 4 * SECOND


def test_a_retry_after_is_honoured_up_to_a_day() -> None:
    assert next_attempt(1, NOW, 10 * 365 * 86400.0, Fixed(0.0)) == NOW + 86400 * SECOND


@pytest.mark.parametrize(("max_attempts", "last_retried"), [(8, 7), (3, 2), (1, 0)])
def test_a_delivery_is_dead_after_the_configured_attempts(max_attempts: int, last_retried: int) -> None:
    if last_retried:
        assert next_attempt(last_retried, NOW, None, Fixed(0.5), max_attempts=max_attempts) is not None
    assert next_attempt(last_retried + 1, NOW, None, Fixed(0.5), max_attempts=max_attempts) is None
    assert next_attempt(last_retried + 1, NOW, 5.0, Fixed(0.5), max_attempts=max_attempts) is None


def test_the_attempts_and_the_lease_are_settings_with_defaults_8_and_60_seconds() -> None:
    assert Settings().outbox_max_attempts == 8
    assert Settings().worker_lease_seconds == 60
    configured = Settings.from_env({"IOP_FHIR_OUTBOX_MAX_ATTEMPTS": "3", "IOP_FHIR_WORKER_LEASE_SECONDS": "5"})
    assert (configured.outbox_max_attempts, configured.worker_lease_seconds) == (3, 5)


# -- enqueue and the store ----------------------------------------------------------------------------------------


@pytest.fixture
def store(db_url: str) -> Iterator[SqlStore]:
    store = SqlStore(db_url)
    yield store
    store.close()


def add(
    store: SqlStore,
    *,
    partner: str = "passaic-valley-recovery",
    record: tuple[str, str | None] = ("discharge", "d1"),
    now: int = NOW,
    blocked: str | None = None,
) -> str:
    with store.write() as tx:
        return outbox.enqueue(
            tx, partner, record[0], record[1], "bundle", outbox.bundle_payload(BUNDLE), now=now, blocked=blocked
        )


def test_an_enqueued_delivery_is_pending_due_now_with_its_payload(store: SqlStore) -> None:
    delivery_id = add(store)
    stored = store.delivery(delivery_id)
    assert stored == Delivery(
        id=delivery_id,
        partner_id="passaic-valley-recovery",
        record_kind="discharge",
        record_id="d1",
        kind="bundle",
        payload={"method": "POST", "url": "", "body": BUNDLE},
        status="pending",
        attempts=0,
        next_attempt_at=NOW,
        created=NOW,
        updated=NOW,
    )


def test_an_enqueued_delivery_is_rolled_back_with_its_transaction(store: SqlStore) -> None:
    with pytest.raises(RuntimeError), store.write() as tx:
        tx.save_record(StoredRecord("discharge", "d1", "e1", "active", 1, {"reason": "completed"}, [], NOW, NOW))
        outbox.enqueue(tx, "p1", "discharge", "d1", "bundle", outbox.bundle_payload(BUNDLE), now=NOW)
        raise RuntimeError("the write failed after the enqueue")
    assert store.deliveries() == ([], 0)
    assert store.record("discharge", "d1") is None
    assert store.claim("w1", NOW + SECOND, 60, 10) == []


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        ("email", outbox.bundle_payload(BUNDLE)),
        ("bundle", {"method": "POST", "url": "Task", "body": BUNDLE}),
        ("bundle", {"method": "POST", "url": ""}),
        ("notification", {"method": "DELETE", "url": "Task/t1", "body": {}}),
        ("notification", {"method": "PUT", "url": "Task/t1", "body": "text"}),
        ("notification", {"method": "PUT", "url": "Task/t1", "body": {}, "auth": "secret"}),
        ("notification", {"method": "POST", "url": "https://hook.example", "body": None, "headers": {"X-N": 1}}),
        ("bundle", {"method": "POST", "url": "", "body": None}),
    ],
)
def test_a_malformed_delivery_is_refused_before_it_is_stored(
    store: SqlStore, kind: str, payload: dict[str, Any]
) -> None:
    with pytest.raises(ValueError), store.write() as tx:
        outbox.enqueue(tx, "p1", "discharge", "d1", kind, payload, now=NOW)
    assert store.deliveries() == ([], 0)


def test_a_notification_may_carry_headers_and_no_body_and_neither_is_shown(store: SqlStore) -> None:
    payload = {
        "method": "POST",
        "url": "https://user:pw@hook.example:8443/notify?patient=MRN-000123",
        "headers": {"Authorization": "Bearer synthetic-token"},
        "body": None,
    }
    with store.write() as tx:
        delivery_id = outbox.enqueue(tx, "subscription:s1", "Observation", "o1", "notification", payload, now=NOW)
    stored = store.delivery(delivery_id)
    assert stored is not None
    assert stored.payload == payload
    shown = outbox.to_json(stored)
    assert shown["payload"] == {"method": "POST", "url": "https://hook.example:8443/notify"}
    assert "synthetic-token" not in str(shown)


def test_a_claim_leases_due_rows_to_one_worker_and_counts_the_attempt(store: SqlStore) -> None:
    first, second = add(store, now=NOW), add(store, now=NOW + 10 * SECOND)
    claimed = store.claim("w1", NOW + SECOND, 60, 10)
    assert [d.id for d in claimed] == [first]
    (row,) = claimed
    assert (row.status, row.attempts, row.leased_by) == ("delivering", 1, "w1")
    assert row.lease_until == row.next_attempt_at == NOW + 61 * SECOND
    assert store.claim("w2", NOW + 2 * SECOND, 60, 10) == []  # leased; the other is not due yet
    assert [d.id for d in store.claim("w2", NOW + 10 * SECOND, 60, 10)] == [second]


def test_a_claim_takes_at_most_the_limit_oldest_due_first(store: SqlStore) -> None:
    ids = [add(store, now=NOW + i) for i in range(5)]
    assert [d.id for d in store.claim("w1", NOW + SECOND, 60, 3)] == ids[:3]
    assert [d.id for d in store.claim("w1", NOW + SECOND, 60, 3)] == ids[3:]


def test_a_row_whose_worker_died_is_claimed_again_after_the_lease(store: SqlStore) -> None:
    delivery_id = add(store)
    assert len(store.claim("dead-worker", NOW, 30, 10)) == 1
    assert store.claim("w2", NOW + 29 * SECOND, 30, 10) == []
    (again,) = store.claim("w2", NOW + 30 * SECOND, 30, 10)
    assert (again.id, again.leased_by, again.attempts) == (delivery_id, "w2", 2)
    # The first worker, back from the dead, can no longer complete a row it lost.
    assert store.delivered(delivery_id, "dead-worker", NOW + 31 * SECOND, None) is False
    assert store.failed(delivery_id, "dead-worker", NOW + 31 * SECOND, {"message": "x"}, None) is False
    assert store.delivered(delivery_id, "w2", NOW + 31 * SECOND, {"resourceType": "Bundle"}) is True
    done = store.delivery(delivery_id)
    assert done is not None
    assert (done.status, done.delivered_at, done.lease_until, done.response) == (
        "delivered",
        NOW + 31 * SECOND,
        None,
        {"resourceType": "Bundle"},
    )
    assert store.claim("w3", NOW + 3600 * SECOND, 30, 10) == []


def test_a_lease_is_renewed_only_by_its_holder(store: SqlStore) -> None:
    delivery_id = add(store)
    store.claim("w1", NOW, 30, 10)
    assert store.renew(delivery_id, "w1", NOW + 20 * SECOND, 30) is True
    assert store.claim("w2", NOW + 40 * SECOND, 30, 10) == []
    assert store.renew(delivery_id, "w2", NOW + 40 * SECOND, 30) is False
    assert len(store.claim("w2", NOW + 50 * SECOND, 30, 10)) == 1
    assert store.renew(delivery_id, "w1", NOW + 51 * SECOND, 30) is False


def test_a_retryable_failure_makes_the_row_pending_at_the_next_attempt_with_the_error_kept(store: SqlStore) -> None:
    delivery_id = add(store)
    store.claim("w1", NOW, 60, 10)
    error = {"status": 503, "retryable": True, "message": "POST fhir.example/R4 answered 503", "outcome": None}
    assert store.failed(delivery_id, "w1", NOW + SECOND, error, NOW + 5 * SECOND) is True
    row = store.delivery(delivery_id)
    assert row is not None
    assert (row.status, row.attempts, row.next_attempt_at, row.lease_until, row.last_error) == (
        "pending",
        1,
        NOW + 5 * SECOND,
        None,
        error,
    )
    assert store.claim("w1", NOW + 4 * SECOND, 60, 10) == []
    assert [d.attempts for d in store.claim("w1", NOW + 5 * SECOND, 60, 10)] == [2]


def test_a_dead_row_is_kept_listed_never_claimed_and_made_pending_by_retry(store: SqlStore) -> None:
    delivery_id = add(store)
    store.claim("w1", NOW, 60, 10)
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid"}]}
    error = {"status": 422, "retryable": False, "message": "answered 422", "outcome": outcome}
    store.failed(delivery_id, "w1", NOW + SECOND, error, None)
    assert store.claim("w1", NOW + 10**6 * SECOND, 60, 10) == []
    dead, total = store.deliveries(status="dead")
    assert total == 1
    assert (dead[0].id, dead[0].last_error) == (delivery_id, error)
    assert store.retry(delivery_id, NOW + 100 * SECOND) is True
    assert store.retry(delivery_id, NOW + 100 * SECOND) is False  # pending now: not retryable by hand
    (again,) = store.claim("w1", NOW + 100 * SECOND, 60, 10)
    assert again.attempts == 2
    store.delivered(delivery_id, "w1", NOW + 101 * SECOND, None)
    assert store.retry(delivery_id, NOW + 102 * SECOND) is False
    assert [d.status for d in store.deliveries()[0]] == ["delivered"]


def test_a_blocked_row_waits_for_an_operator(store: SqlStore) -> None:
    delivery_id = add(store, blocked="no active consent covers this recipient")
    row = store.delivery(delivery_id)
    assert row is not None
    assert row.status == "blocked"
    assert row.last_error == {"retryable": False, "message": "no active consent covers this recipient"}
    assert store.claim("w1", NOW + 3600 * SECOND, 60, 10) == []
    assert store.retry(delivery_id, NOW + SECOND) is True
    assert [d.id for d in store.claim("w1", NOW + SECOND, 60, 10)] == [delivery_id]


def test_released_rows_are_due_again_with_the_attempt_given_back(store: SqlStore) -> None:
    ids = [add(store) for _ in range(3)]
    store.claim("w1", NOW, 60, 10)
    assert store.release("w2", ids, NOW + SECOND) == 0  # not its rows
    assert store.release("w1", ids[1:], NOW + SECOND) == 2
    again = store.claim("w2", NOW + SECOND, 60, 10)
    assert sorted(d.id for d in again) == sorted(ids[1:])
    assert {d.attempts for d in again} == {1}


def test_deliveries_are_listed_oldest_first_filtered_by_partner_status_and_record(store: SqlStore) -> None:
    a = add(store, partner="p1", record=("discharge", "d1"), now=NOW + 1)
    b = add(store, partner="p2", record=("discharge", "d1"), now=NOW + 2)
    c = add(store, partner="p1", record=("referral", "r1"), now=NOW + 3)
    d = add(store, partner="p1", record=("discharge", "d2"), now=NOW + 4, blocked="no consent")
    assert [x.id for x in store.deliveries()[0]] == [a, b, c, d]
    assert [x.id for x in store.deliveries(partner_id="p1")[0]] == [a, c, d]
    assert [x.id for x in store.deliveries(record_kind="discharge", record_id="d1")[0]] == [a, b]
    assert [x.id for x in store.deliveries(partner_id="p1", status="blocked")[0]] == [d]
    page, total = store.deliveries(partner_id="p1", offset=1, count=1)
    assert ([x.id for x in page], total) == ([c], 3)
    assert store.deliveries(count=0) == ([], 4)
    assert store.deliveries(partner_id="nobody") == ([], 0)
    assert store.delivery("00000000-0000-0000-0000-000000000000") is None


# -- no row is ever leased to two workers -------------------------------------------------------------------------


def _claim_all(store: SqlStore, worker: str, batch: int) -> list[str]:
    got: list[str] = []
    while True:
        rows = store.claim(worker, NOW + SECOND, 60, batch)
        if not rows:
            return got
        got.extend(r.id for r in rows)
        time.sleep(0.01)  # delivering them, which is when other workers claim


def test_threads_claiming_at_once_never_get_the_same_row(store: SqlStore) -> None:
    ids = [add(store, now=NOW + i) for i in range(200)]
    barrier = threading.Barrier(8)

    def claimer(n: int) -> list[str]:
        barrier.wait(timeout=30)
        return _claim_all(store, f"w{n}", 3)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(claimer, range(8)))
    counts = Counter(i for got in results for i in got)
    assert sorted(counts) == sorted(ids)
    assert set(counts.values()) == {1}
    assert sum(1 for got in results if got) > 1


def _process_worker(url: str, n: int, start: Any, out: Any) -> None:
    """A worker process: `worker.run` with a deliver that records which rows it was given."""

    seen: list[str] = []

    def deliver(row: Delivery, partner: dict[str, Any]) -> dict[str, Any]:
        seen.append(row.id)
        time.sleep(0.002)  # a partner's round trip, so that the two workers interleave
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": []}

    start.wait(120)
    run_worker(Settings(database_url=url), once=True, batch=5, deliver=deliver, worker_id=f"process-{n}")
    out.put(seen)


def test_two_worker_processes_deliver_each_row_exactly_once(store: SqlStore, db_url: str) -> None:
    with store.write() as tx:
        tx.save_record(
            StoredRecord(
                "partner",
                "passaic-valley-recovery",
                None,
                "active",
                1,
                {
                    "id": "passaic-valley-recovery",
                    "kind": "aftercare-provider",
                    "name": "Synthetic Aftercare",
                    "fhir_base_url": "http://127.0.0.1:9/fhir",
                },
                [],
                NOW,
                NOW,
            )
        )
    started = now_us()
    ids = [add(store, now=started + i) for i in range(200)]
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=_process_worker, args=(db_url, n, start, out)) for n in range(2)]
    for w in workers:
        w.start()
    start.set()
    results = [out.get(timeout=300) for _ in workers]
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    counts = Counter(i for seen in results for i in seen)
    assert sorted(counts) == sorted(ids)
    assert set(counts.values()) == {1}
    assert all(results), "both workers delivered"
    delivered, total = store.deliveries(status="delivered", count=500)
    assert total == 200
    assert {d.attempts for d in delivered} == {1}
    assert {d.leased_by for d in delivered} == {"process-0", "process-1"}
