"""`iop-fhir worker`: claims due outbox rows, delivers each to its partner, and records what happened.

At-least-once: a row is leased, not removed, while it is delivered; if the worker dies, the lease expires and another
worker takes the row. Receivers make replays harmless (conditional updates on business identifiers, package.py).
Logs name deliveries, partners and error types only, never payloads or partner messages (PHI).

Part 2 (privacy/pushes.py): right before a Bundle goes to a partner the patient's consent is decided again (it
may have been revoked, retracted or have expired since the row was queued); if none permits it now the row becomes
blocked and nothing is sent. Once a partner has taken a Bundle, the disclosure's row is committed to the audit log
(before the row is marked delivered, so a crash between the two repeats the delivery and its audit, never loses the
audit).

The worker also runs Bulk Data export jobs (fhir/export.py) that are queued or whose process died.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

import orjson

from iop_fhir.config import Settings
from iop_fhir.exchange import outbox
from iop_fhir.privacy import pushes
from iop_fhir.r4.instants import now_us
from iop_fhir.store.base import Delivery, Store

if TYPE_CHECKING:
    from iop_fhir.exchange.client import PartnerClient
    from iop_fhir.fhir.export import Exporter
    from iop_fhir.fhir.repository import Repository

log = logging.getLogger(__name__)

# deliver(row, partner) sends one row to the partner (the partner record as loaded) and returns the partner's answer.
# It raises DeliveryError (exchange/client.py) for a failure the partner or the network reported.
Deliver = Callable[[Delivery, dict[str, Any]], dict[str, Any] | None]
# Rows of rest-hook notifications (exchange/subscriptions.py) name their Subscription, not a partner.
SUBSCRIPTION_PREFIX = "subscription:"


class Undeliverable(Exception):
    """A row that can never be delivered as it is (unknown partner, unsupported request); its message is stored."""

    def to_json(self) -> dict[str, Any]:
        return {"status": None, "retryable": False, "message": str(self), "outcome": None, "retry_after": None}


class PartnerDeliverer:
    """The default ``deliver``: one PartnerClient per partner, so that a SMART access token is reused across rows.

    A client is made again when the partner record changes, after a 401, and every ``client_ttl`` seconds, so that
    a secret rotated on disk is picked up.
    """

    def __init__(self, settings: Settings, *, client_ttl: float = 300.0) -> None:
        self.settings = settings
        self.client_ttl = client_ttl
        self._clients: dict[str, tuple[bytes, float, PartnerClient]] = {}

    def __call__(self, row: Delivery, partner: dict[str, Any]) -> dict[str, Any] | None:
        from iop_fhir.exchange.client import DeliveryError

        client = self._client(row.partner_id, partner)
        method, url, body = row.payload["method"], row.payload["url"], row.payload["body"]
        # PartnerClient speaks to the partner's FHIR base only: absolute URLs and extra headers are not its to send.
        relative = bool(url) and "://" not in url and not row.payload.get("headers")
        try:
            if method == "POST" and url == "" and isinstance(body, dict):
                return client.transaction(body)
            if method == "PUT" and relative and isinstance(body, dict):
                return client.update(url, body)
        except DeliveryError as error:
            if error.status == 401:
                self._clients.pop(row.partner_id, None)
            raise
        shown = outbox.shown_url(url)
        raise Undeliverable(f"a {row.kind} delivery {method} to {shown!r} is not supported by the partner client")

    def _client(self, partner_id: str, partner: dict[str, Any]) -> PartnerClient:
        from iop_fhir.exchange.partners import client_for

        fingerprint = orjson.dumps(partner, option=orjson.OPT_SORT_KEYS)
        cached = self._clients.get(partner_id)
        if cached is not None and cached[0] == fingerprint and time.monotonic() < cached[1]:
            return cached[2]
        client = client_for(partner, self.settings)
        self._clients[partner_id] = (fingerprint, time.monotonic() + self.client_ttl, client)
        return client


class _Stop:
    """SIGTERM and SIGINT ask the loop to stop after the row in progress; handlers are restored afterwards."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        log.info("worker: %s received, stopping after the current delivery", signal.Signals(signum).name)
        self.requested = True

    def __enter__(self) -> _Stop:
        # Signal handlers can only be set from the main thread (tests run the loop in others).
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def sleep(self, seconds: float) -> None:
        # In short steps: a signal does not cut time.sleep short (PEP 475), and a stop should not wait a whole poll.
        deadline = time.monotonic() + seconds
        while not self.requested and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))


def run(
    worker: Worker,
    *,
    exports: Exporter | None = None,
    once: bool = False,
    poll: float = 1.0,
    batch: int = 20,
    follow: Callable[[], int] | None = None,
    follow_every: float = 0.0,
    pull: Callable[[], int] | None = None,
    sync_every: float = 0.0,
) -> int:
    """Deliver due outbox rows until stopped (SIGTERM, SIGINT), polling every ``poll`` seconds when none is due;
    with ``once``, deliver what is due and return. Between batches, run due export jobs, and every ``follow_every``
    / ``sync_every`` seconds follow transitions (``follow``) and pull from hospital EHRs (``pull``); a failed pass
    of either is tried again at the next one. runtime.run_worker assembles the parts. Returns the exit status (0)."""
    followed_at = 0.0
    synced_at = 0.0
    with _Stop() as stop:
        log.info("worker %s: started", worker.worker_id)
        while not stop.requested:
            claimed = worker.deliver_due(batch, stop)
            if exports is not None:
                claimed += exports.run_due(lambda: stop.requested)
            if follow is not None and (once or time.monotonic() - followed_at >= follow_every):
                followed_at = time.monotonic()
                _pass("following transitions", follow)
            if pull is not None and (once or time.monotonic() - synced_at >= sync_every):
                synced_at = time.monotonic()
                _pass("sync", pull)
            if once and claimed == 0:
                break
            if claimed == 0:
                stop.sleep(poll)
        log.info("worker %s: stopped", worker.worker_id)
    return 0


def _pass(what: str, run_pass: Callable[[], int]) -> int:
    try:
        return run_pass()
    except Exception as error:  # tried again at the next pass; the worker keeps delivering
        log.error("%s failed: %s", what, type(error).__name__)
        return 0


class Worker:
    """Claims rows for one worker id and records the outcome of each delivery."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        deliver: Deliver,
        lease: float,
        worker_id: str,
        repository: Repository,
    ) -> None:
        self.store = store
        self.settings = settings
        self.deliver = deliver
        self.lease = lease
        self.worker_id = worker_id
        self.repository = repository  # disclosures are audited in its store's audit log

    def deliver_due(self, batch: int, stop: _Stop | None = None) -> int:
        """Claim up to ``batch`` due rows and deliver them; rows not reached before a stop go back to pending.
        Returns how many rows were claimed."""
        rows = self.store.claim(self.worker_id, now_us(), self.lease, batch)
        for index, row in enumerate(rows):
            if stop is not None and stop.requested:
                self.store.release(self.worker_id, [r.id for r in rows[index:]], now_us())
                break
            self.process(row)
        return len(rows)

    def process(self, row: Delivery) -> None:
        """Deliver one claimed row and record the outcome (delivered, pending again, or dead)."""
        now = now_us()
        # Earlier rows of the batch may have used up much of the lease: take it again for this one, unless it has
        # already passed to another worker.
        if row.lease_until is not None and now + self.lease * 500_000 > row.lease_until:
            if not self.store.renew(row.id, self.worker_id, now, self.lease):
                log.info("delivery %s: lease passed to another worker; skipped", row.id)
                return
        from iop_fhir.exchange.client import DeliveryError

        if row.attempts > self.settings.outbox_max_attempts:
            # Every earlier claim of this row ended without an outcome (the worker died during it): stop here
            # rather than let the row take workers down for ever.
            message = f"gave up after {row.attempts - 1} attempts that never finished"
            report = {"status": None, "retryable": False, "message": message, "outcome": None, "retry_after": None}
            self._failed(row, report, False)
            return
        disclosure = pushes.of(row, self.store)
        if disclosure is not None:
            reason = pushes.refusal(disclosure, row.payload["body"], self.store, pushes.today())
            if reason is not None:
                self._blocked(row, reason)
                return
        try:
            if row.partner_id.startswith(SUBSCRIPTION_PREFIX):
                answer = self.notify(row)
            else:
                partner = self._partner(row.partner_id)
                answer = self.deliver(row, partner)
        except (DeliveryError, Undeliverable) as error:
            self._failed(row, error.to_json(), error.retryable if isinstance(error, DeliveryError) else False)
            return
        except Exception as error:
            # The message of an arbitrary exception may quote the payload (PHI): keep the type and frames only.
            log.error(
                "delivery %s: unexpected %s\n%s",
                row.id,
                type(error).__name__,
                "".join(traceback.format_tb(error.__traceback__)),
            )
            message = f"unexpected {type(error).__name__} in the worker"
            report = {"status": None, "retryable": True, "message": message, "outcome": None, "retry_after": None}
            self._failed(row, report, True)
            return
        if disclosure is not None:
            self._audit(row, disclosure)
        if self.store.delivered(row.id, self.worker_id, now_us(), outbox.response_summary(answer)):
            log.info("delivery %s to %s: delivered (attempt %d)", row.id, row.partner_id, row.attempts)
        else:
            log.warning("delivery %s: delivered, but its lease had passed to another worker", row.id)

    def notify(self, row: Delivery) -> dict[str, Any] | None:
        """A rest-hook notification (exchange/subscriptions.py): exactly the method, URL, headers and body the row
        holds, with no partner auth and no redirects; 2xx is delivered, anything else is classified like any
        partner answer. Headers may carry the subscriber's token and are never logged."""
        import requests

        from iop_fhir.exchange.client import USER_AGENT, error_for_exception, error_for_response, where

        payload = row.payload
        method, url, body = payload["method"], payload["url"], payload.get("body")
        headers = {"User-Agent": USER_AGENT, **(payload.get("headers") or {})}
        data = None
        if body is not None:
            headers.setdefault("Content-Type", "application/fhir+json")
            data = orjson.dumps(body)
        what = where(method, url)
        try:
            response = requests.request(
                method,
                url,
                data=data,
                headers=headers,
                timeout=self.settings.partner_timeout,
                allow_redirects=False,
            )
        except requests.RequestException as error:
            raise error_for_exception(error, what) from None
        if not 200 <= response.status_code < 300:
            raise error_for_response(response, what)
        return None

    def _blocked(self, row: Delivery, reason: str) -> None:
        report = {"status": None, "retryable": False, "message": reason, "outcome": None, "retry_after": None}
        if self.store.blocked(row.id, self.worker_id, now_us(), report):
            log.info("delivery %s to %s: blocked, no consent permits it now; nothing sent", row.id, row.partner_id)
        else:
            log.warning("delivery %s: not sent, and its lease had passed to another worker", row.id)

    def _audit(self, row: Delivery, disclosure: pushes.Disclosure) -> None:
        # The partner has the records whatever happens next: the disclosure is audited even if the lease passed.
        try:
            event = pushes.record_audit(self.repository.store, disclosure, now_us())
        except Exception as error:  # never PHI: the type only
            log.error("delivery %s: delivered, but its audit row failed: %s", row.id, type(error).__name__)
            return
        log.info("delivery %s: disclosure audited as %s", row.id, event)

    def _partner(self, partner_id: str) -> dict[str, Any]:
        record = self.store.record("partner", partner_id)
        if record is None:
            raise Undeliverable(f"partner {partner_id} is not known; create it at /iop/partners, then retry")
        if record.status != "active" or record.content.get("active") is False:
            raise Undeliverable(f"partner {partner_id} is inactive; activate it, then retry")
        return record.content

    def _failed(self, row: Delivery, error: dict[str, Any], retryable: bool) -> None:
        now = now_us()
        retry_after = error.get("retry_after")
        due = (
            outbox.next_attempt(
                row.attempts,
                now,
                retry_after if isinstance(retry_after, int | float) else None,
                max_attempts=self.settings.outbox_max_attempts,
            )
            if retryable
            else None
        )
        if not self.store.failed(row.id, self.worker_id, now, error, due):
            log.warning("delivery %s: failed, but its lease had passed to another worker", row.id)
        elif due is None:
            log.warning(
                "delivery %s to %s: dead after %d attempt(s) (status %s)",
                row.id,
                row.partner_id,
                row.attempts,
                error.get("status"),
            )
        else:
            log.info(
                "delivery %s to %s: failed (status %s), next attempt in %.1f s",
                row.id,
                row.partner_id,
                error.get("status"),
                (due - now) / 1_000_000,
            )
