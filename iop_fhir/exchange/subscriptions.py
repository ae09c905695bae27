"""R4 Subscriptions with a rest-hook channel: checked when written, matched against every stored version inside the
write's transaction, and notified through the outbox (https://hl7.org/fhir/R4/subscription.html)."""

from __future__ import annotations

import logging
import re
import threading
import weakref
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from iop_fhir.errors import FhirError, Invalid, Issue
from iop_fhir.exchange import outbox
from iop_fhir.fhir import definitions, search
from iop_fhir.fhir.instants import now_us
from iop_fhir.fhir.repository import Repository
from iop_fhir.store.base import StoredResource, WriteTx

log = logging.getLogger(__name__)

# The outbox row of a notification names its subscription where a delivery names its partner.
PARTNER_PREFIX = "subscription:"
# partner_id is a 64-character column: "subscription:" leaves 51 for the Subscription's id.
MAX_ID = 64 - len(PARTNER_PREFIX)
# Payload mime types sent as JSON (R4's own, the DSTU2 spelling, plain JSON); XML is not produced here.
JSON_PAYLOADS = ("application/fhir+json", "application/json+fhir", "application/json")
_HEADER = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\r\n]*?)[ \t]*\Z")
_PAGE = 500


@dataclass(frozen=True)
class Rule:
    """What an active Subscription asks for: resources of ``res_type`` matching ``params``, sent to ``endpoint``."""

    id: str
    res_type: str
    params: tuple[tuple[str, str], ...]
    endpoint: str
    headers: tuple[tuple[str, str], ...]
    payload: str | None  # the mime type; None: a notification without a body
    end: int | None  # µs; no notifications after it


def notification_payload(rule: Rule, resource: dict[str, Any]) -> dict[str, Any]:
    """What the worker sends for a rest-hook notification: the request, complete, so it needs no Subscription.

    R4 (subscription-channel-type ``rest-hook``): without ``channel.payload`` a POST to the endpoint with no body;
    with one, the endpoint is a FHIR base and the resource is PUT to ``[endpoint]/[type]/[id]`` in that mime type.
    Every ``channel.header`` line goes along.
    """
    headers: dict[str, str] = {}
    for name, value in rule.headers:
        if rule.payload is not None and name.lower() == "content-type":
            continue  # the body's type is the payload's mime type
        # Repeated header lines combine into one comma-separated field (RFC 9110 §5.3).
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if rule.payload is None:
        return {"method": "POST", "url": rule.endpoint, "headers": headers, "body": None}
    headers["Content-Type"] = rule.payload
    url = f"{rule.endpoint.rstrip('/')}/{resource['resourceType']}/{resource['id']}"
    return {"method": "PUT", "url": url, "headers": headers, "body": resource}


def rule_of(subscription: dict[str, Any]) -> Rule:
    """The Rule of a Subscription resource; Invalid (one issue per problem, each with its path) if this server
    cannot serve it."""
    issues: list[Issue] = []
    res_id = str(subscription.get("id") or "")
    if len(res_id) > MAX_ID:
        issues.append(Issue("value", f"a Subscription id here is at most {MAX_ID} characters long", "Subscription.id"))
    criteria = subscription.get("criteria")
    res_type = ""
    params: tuple[tuple[str, str], ...] = ()
    try:
        res_type, params = parse_criteria(criteria)
    except Invalid as error:
        issues += error.issues
    channel = subscription.get("channel")
    channel = channel if isinstance(channel, dict) else {}
    if channel.get("type") != "rest-hook":
        issues.append(
            Issue(
                "not-supported",
                f"channel type {channel.get('type')!r} is not supported; this server notifies through rest-hook only",
                "Subscription.channel.type",
            )
        )
    endpoint = channel.get("endpoint")
    parts = urlsplit(endpoint) if isinstance(endpoint, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        issues.append(
            Issue("required", "a rest-hook channel needs an absolute http(s) endpoint", "Subscription.channel.endpoint")
        )
    payload = channel.get("payload")
    if payload is not None and str(payload).split(";", 1)[0].strip().lower() not in JSON_PAYLOADS:
        issues.append(
            Issue(
                "not-supported",
                f"payload {str(payload)[:100]!r} is not supported; use application/fhir+json, or leave it out for "
                "notifications without a body",
                "Subscription.channel.payload",
            )
        )
    headers: list[tuple[str, str]] = []
    for index, line in enumerate(channel.get("header") or []):
        match = _HEADER.match(line) if isinstance(line, str) else None
        if match is None:
            issues.append(Issue("value", "a header is one line 'Name: value'", f"Subscription.channel.header[{index}]"))
        else:
            headers.append((match.group(1), match.group(2)))
    if issues:
        raise Invalid(issues)
    end = subscription.get("end")
    return Rule(
        id=res_id,
        res_type=res_type,
        params=params,
        endpoint=str(endpoint),
        headers=tuple(headers),
        payload=None if payload is None else str(payload),
        end=_instant_us(end) if isinstance(end, str) else None,
    )


def parse_criteria(criteria: Any) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``Type?name=value&...`` -> (type, parameters), checked as a search of this server would check them;
    Invalid with expression ``Subscription.criteria`` if it is none."""

    def invalid(text: str, code: str = "invalid") -> Invalid:
        return Invalid([Issue(code, f"criteria: {text}", "Subscription.criteria")])

    if not isinstance(criteria, str) or not criteria.strip():
        raise invalid("a Subscription needs criteria: a search such as Observation?code=http://loinc.org|1975-2")
    res_type, _, query = criteria.strip().partition("?")
    if res_type not in definitions.resource_types():
        raise invalid(f"'{res_type[:64]}' is not a resource type; criteria are Type?search-parameters")
    params = tuple(parse_qsl(query, keep_blank_values=True))
    for key, _ in params:
        if key.split(":", 1)[0] in search.RESULT_PARAMETERS:
            raise invalid(f"result parameter '{key[:64]}' has no place in criteria")
    try:
        search.parse(res_type, list(params))
    except FhirError as error:
        issues = [Issue(i.code, f"criteria: {i.diagnostics}", "Subscription.criteria") for i in error.issues]
        raise Invalid(issues) from None
    return res_type, params


def _instant_us(text: str) -> int | None:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:  # a date without a time: its start, as UTC
        return None
    return int(moment.timestamp() * 1_000_000)


class Subscriptions:
    """The write hook (Repository.write_hooks) that keeps Subscriptions servable and notifies their endpoints.

    Active Subscriptions are cached per process. Whether the cache still holds is checked once per write
    transaction against the store (how many Subscription versions it holds, and when the newest was written), so a
    Subscription written or deleted by another process counts from that process's commit on.
    """

    def __init__(self, repository: Repository) -> None:
        self.repository = repository
        self._lock = threading.Lock()
        self._cached: tuple[tuple[int, int | None], dict[str, list[Rule]]] | None = None
        # Per transaction: the rules it uses; a transaction that wrote a Subscription reads its own view.
        self._per_tx: weakref.WeakKeyDictionary[Any, dict[str, list[Rule]]] = weakref.WeakKeyDictionary()
        self._wrote: weakref.WeakSet[Any] = weakref.WeakSet()

    def on_write(self, tx: WriteTx, resource: dict[str, Any], stored: StoredResource) -> None:
        if stored.res_type == "Subscription":
            rule_of(resource)  # refuses (and so rolls back) a Subscription this server cannot serve
            self._wrote.add(tx)
            self._per_tx.pop(tx, None)
            if resource.get("status") == "requested":
                # R4: the server sets a requested Subscription active (or error) once it can serve it. The
                # active version's own write comes back here and is matched like any other.
                self.repository.update_in(tx, "Subscription", stored.res_id, {**resource, "status": "active"})
                return
        rules = self._rules(tx).get(stored.res_type)
        if not rules:
            return
        now = now_us()
        for rule in rules:
            if rule.end is not None and rule.end <= now:
                continue
            if self._matches(tx, rule, stored.res_id):
                outbox.enqueue(
                    tx,
                    PARTNER_PREFIX + rule.id,
                    stored.res_type[:32],  # record_kind is 32 characters; one R4 type name is 33
                    stored.res_id,
                    "notification",
                    notification_payload(rule, resource),
                )

    @staticmethod
    def _matches(tx: WriteTx, rule: Rule, res_id: str) -> bool:
        request = search.parse(rule.res_type, [*rule.params, ("_id", res_id), ("_count", "1")])
        return bool(tx.search(request).matches)

    def _rules(self, tx: WriteTx) -> dict[str, list[Rule]]:
        rules = self._per_tx.get(tx)
        if rules is not None:
            return rules
        if tx in self._wrote:  # not committed yet: neither from nor into the shared cache
            rules = _load(tx)
        else:
            token = tx.type_state("Subscription")
            with self._lock:
                cached = self._cached
            if cached is not None and cached[0] == token:
                rules = cached[1]
            else:
                rules = _load(tx)
                with self._lock:
                    self._cached = (token, rules)
        self._per_tx[tx] = rules
        return rules


def _load(tx: WriteTx) -> dict[str, list[Rule]]:
    """The rules of every active Subscription, by resource type."""
    rules: dict[str, list[Rule]] = {}
    offset = 0
    while True:
        params = [("status", "active"), ("_sort", "_id"), ("_count", str(_PAGE)), ("_offset", str(offset))]
        found = tx.search(search.parse("Subscription", params, default_count=_PAGE, max_count=_PAGE))
        for stored in found.matches:
            if stored.content is None:
                continue
            try:
                rule = rule_of(orjson.loads(stored.content))
            except Invalid:
                # Stored before these checks existed; it cannot be served, and says so nowhere else.
                log.warning("Subscription/%s cannot be served and is skipped", stored.res_id)
                continue
            rules.setdefault(rule.res_type, []).append(rule)
        if not found.has_more:
            return rules
        offset += _PAGE
