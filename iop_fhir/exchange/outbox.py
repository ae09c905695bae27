"""The durable outbox: adding a delivery inside a write's transaction, when a failed delivery is tried again, and what
of a delivery may be shown (never a payload body: it holds PHI).

Backoff: https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/ ("full jitter"); Retry-After:
https://www.rfc-editor.org/rfc/rfc9110#section-10.2.3.
"""

from __future__ import annotations

import random
import uuid
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from iop_fhir.r4 import instants
from iop_fhir.store.base import Delivery, OutboxTx

KINDS = ("bundle", "notification")
METHODS = ("POST", "PUT")
BASE_DELAY_S = 2.0
MAX_DELAY_S = 3600.0
# A partner's Retry-After is honoured up to a day: a misconfigured far-future date must not park a row for years.
MAX_RETRY_AFTER_S = 86400.0
DEFAULT_MAX_ATTEMPTS = 8


class Jitter(Protocol):
    def uniform(self, a: float, b: float) -> float: ...


_RANDOM = random.Random()


def backoff_ceiling(attempts: int) -> float:
    """The longest wait after the ``attempts``-th failed attempt: 2 s, 4 s, 8 s, ... up to 1 h."""
    exponent = min(max(attempts, 1) - 1, 32)  # 2 s × 2^32 is far past the cap; bounding it avoids float overflow
    return min(MAX_DELAY_S, BASE_DELAY_S * 2.0**exponent)


def next_attempt(
    attempts: int,
    now_us: int,
    retry_after_s: float | None = None,
    rng: Jitter | None = None,
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> int | None:
    """When to try again (µs since the epoch) after the ``attempts``-th attempt failed with a retryable error, or
    None when that was the last allowed attempt (the delivery is dead).

    The wait is drawn uniformly between 0 and the backoff ceiling (full jitter: workers that failed together do not
    retry together); a longer Retry-After from the partner wins.
    """
    if attempts >= max_attempts:
        return None
    delay = (rng or _RANDOM).uniform(0.0, backoff_ceiling(attempts))
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, MAX_RETRY_AFTER_S))
    return now_us + int(delay * 1_000_000)


def enqueue(
    tx: OutboxTx,
    partner_id: str,
    record_kind: str,
    record_id: str | None,
    kind: str,
    payload: dict[str, Any],
    *,
    blocked: str | None = None,
    now: int | None = None,
) -> str:
    """Add a delivery to the outbox in the caller's write transaction; it exists only if that transaction commits.

    ``payload`` is ``{"method", "url", "body"}`` and optionally ``"headers"`` (name -> value, never shown): for a
    ``bundle`` ``{"method": "POST", "url": "", "body": <the transaction Bundle>}``; for a ``notification`` a PUT or
    POST to ``url`` with ``body`` (an object, or null for none). ``blocked`` (a reason, shown as the last error)
    keeps the delivery from being sent until a consent releases it (exchange/transitions.py) or an operator retries
    it (the worker then decides on consent again). Returns the delivery id.
    """
    _check(kind, payload)
    moment = instants.now_us() if now is None else now
    delivery = Delivery(
        id=str(uuid.uuid4()),
        partner_id=partner_id,
        record_kind=record_kind,
        record_id=record_id,
        kind=kind,
        payload=payload,
        status="pending" if blocked is None else "blocked",
        attempts=0,
        next_attempt_at=moment,
        created=moment,
        updated=moment,
        last_error=None if blocked is None else {"retryable": False, "message": blocked},
    )
    tx.enqueue(delivery)
    return delivery.id


def bundle_payload(bundle: dict[str, Any]) -> dict[str, Any]:
    """The payload of a ``bundle`` delivery: the transaction Bundle, POSTed to the partner's base."""
    return {"method": "POST", "url": "", "body": bundle}


def _check(kind: str, payload: dict[str, Any]) -> None:
    # Callers are our own code: a malformed payload is a programming error, refused before it is stored.
    if kind not in KINDS:
        raise ValueError(f"outbox kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not {"method", "url", "body"} <= set(payload) <= {"method", "url", "body", "headers"}:
        raise ValueError("an outbox payload has the members method, url, body and optionally headers")
    if payload["method"] not in METHODS or not isinstance(payload["url"], str):
        raise ValueError(f"an outbox payload's method is one of {', '.join(METHODS)} and its url a string")
    headers = payload.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise ValueError("an outbox payload's headers are an object of strings")
    if kind == "bundle":
        if payload["method"] != "POST" or payload["url"] != "" or not isinstance(payload["body"], dict):
            raise ValueError("a bundle delivery is a Bundle POSTed to the partner's base: method POST, url ''")
    elif payload["body"] is not None and not isinstance(payload["body"], dict):
        raise ValueError("a notification's body is a JSON object or null (no body)")


# -- what may be shown or stored about a delivery ----------------------------------------------------------------


def shown_url(url: str) -> str:
    """A URL as it may be shown or logged: without its query (identifiers may be PHI) and without credentials."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def payload_summary(delivery: Delivery) -> dict[str, Any]:
    """Method, url as shown_url gives it, and for a Bundle its entry count and resource types; never the body or
    the headers."""
    payload = delivery.payload
    summary: dict[str, Any] = {"method": payload.get("method"), "url": shown_url(str(payload.get("url", "")))}
    body = payload.get("body")
    if isinstance(body, dict) and body.get("resourceType") == "Bundle":
        entries = [e for e in body.get("entry") or [] if isinstance(e, dict)]
        types = {str(e["resource"].get("resourceType")) for e in entries if isinstance(e.get("resource"), dict)}
        summary["entries"] = len(entries)
        summary["resource_types"] = sorted(types)
    elif isinstance(body, dict):
        summary["resource_type"] = body.get("resourceType")
    return summary


def response_summary(answer: Any) -> dict[str, Any] | None:
    """What is kept of a partner's answer: per entry its status, location and etag; for a single resource its type,
    id and version. Never the resources themselves."""
    if not isinstance(answer, dict) or not answer:
        return None
    if answer.get("resourceType") == "Bundle":
        entries = []
        for entry in answer.get("entry") or []:
            response = entry.get("response") if isinstance(entry, dict) else None
            if isinstance(response, dict):
                kept = ("status", "location", "etag", "lastModified")
                entries.append({k: response[k] for k in kept if isinstance(response.get(k), str)})
            else:
                entries.append({})
        return {"resourceType": "Bundle", "type": answer.get("type"), "entry": entries}
    meta = answer.get("meta")
    meta = meta if isinstance(meta, dict) else {}
    summary = {"resourceType": answer.get("resourceType"), "id": answer.get("id")}
    if isinstance(meta.get("versionId"), str):
        summary["versionId"] = meta["versionId"]
    return summary


def to_json(delivery: Delivery) -> dict[str, Any]:
    """A delivery as /iop/deliveries shows it."""
    due = delivery.status in ("pending", "delivering")
    return {
        "id": delivery.id,
        "partner": delivery.partner_id,
        "record": {"kind": delivery.record_kind, "id": delivery.record_id},
        "kind": delivery.kind,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "next_attempt": instants.instant(delivery.next_attempt_at) if due else None,
        "last_error": delivery.last_error,
        "payload": payload_summary(delivery),
        "response": delivery.response,
        "created": instants.instant(delivery.created),
        "updated": instants.instant(delivery.updated),
        "delivered_at": None if delivery.delivered_at is None else instants.instant(delivery.delivered_at),
    }
