"""R4 Subscriptions with a rest-hook channel: checked when written, matched against every stored version inside the
write's transaction, and notified through the outbox (https://hl7.org/fhir/R4/subscription.html), in R4's own shape or,
when the channel asks for it, as a Subscriptions R5 Backport notification Bundle
(http://hl7.org/fhir/uv/subscriptions-backport/STU1.1/)."""

from __future__ import annotations

import logging
import re
import threading
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from iop_fhir.errors import FhirError, Invalid, Issue
from iop_fhir.exchange import outbox
from iop_fhir.fhir.repository import Repository
from iop_fhir.r4 import definitions, search
from iop_fhir.r4.instants import instant, now_us
from iop_fhir.store.base import StoredResource, WriteTx

log = logging.getLogger(__name__)

# The outbox row of a notification names its subscription where a delivery names its partner.
PARTNER_PREFIX = "subscription:"
# partner_id is a 64-character column: "subscription:" leaves 51 for the Subscription's id.
MAX_ID = 64 - len(PARTNER_PREFIX)
# Payload mime types sent as JSON (R4's own, the DSTU2 spelling, plain JSON); XML is not produced here.
JSON_PAYLOADS = ("application/fhir+json", "application/json+fhir", "application/json")
# Subscriptions R5 Backport STU 1.1: how much of the resource a notification carries, as an extension on
# Subscription.channel.payload (in JSON on channel._payload); with it, every notification is a history Bundle.
PAYLOAD_CONTENT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content"
PAYLOAD_CONTENTS = ("empty", "id-only", "full-resource")
NOTIFICATION_PROFILE = (
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-notification-r4"
)
STATUS_PROFILE = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4"
_RESPONSE_STATUS = {"POST": "201 Created", "PUT": "200 OK", "PATCH": "200 OK"}
_HEADER = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\r\n]*?)[ \t]*\Z")
_PAGE = 500

# The audit trail is for administrators: no Subscription is told of it (one could reach a client that may not read
# it), and every request writes to it, which would make each read pay for matching the Subscriptions.
UNNOTIFIED = frozenset({"AuditEvent"})


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
    content: str | None = None  # the backport payload content (empty, id-only, full-resource); None: plain R4


def notification_payload(
    rule: Rule,
    resource: dict[str, Any],
    stored: StoredResource,
    *,
    event: int = 0,
    base: str | None = None,
    now: int | None = None,
) -> dict[str, Any]:
    """What the worker sends for a rest-hook notification: the request, complete, so it needs no Subscription.

    R4 (subscription-channel-type ``rest-hook``): without ``channel.payload`` a POST to the endpoint with no body;
    with one, the endpoint is a FHIR base and the resource is PUT to ``[endpoint]/[type]/[id]`` in that mime type.
    With the backport payload-content extension: a POST to the endpoint of the notification Bundle
    (notification_bundle), in the payload's mime type (application/fhir+json if none is given). ``event`` is the
    event's number and ``base`` the public base of this FHIR API, both used by the Bundle only. Every
    ``channel.header`` line goes along.
    """
    has_body = rule.payload is not None or rule.content is not None
    headers: dict[str, str] = {}
    for name, value in rule.headers:
        if has_body and name.lower() == "content-type":
            continue  # the body's type is the payload's mime type
        # Repeated header lines combine into one comma-separated field (RFC 9110 §5.3).
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if not has_body:
        return {"method": "POST", "url": rule.endpoint, "headers": headers, "body": None}
    headers["Content-Type"] = rule.payload or "application/fhir+json"
    if rule.content is not None:
        body = notification_bundle(rule, resource, stored, event=event, base=base, now=now)
        return {"method": "POST", "url": rule.endpoint, "headers": headers, "body": body}
    url = f"{rule.endpoint.rstrip('/')}/{resource['resourceType']}/{resource['id']}"
    return {"method": "PUT", "url": url, "headers": headers, "body": resource}


def notification_bundle(
    rule: Rule,
    resource: dict[str, Any],
    stored: StoredResource,
    *,
    event: int,
    base: str | None,
    now: int | None = None,
) -> dict[str, Any]:
    """The Backport R4 event notification (profile backport-subscription-notification-r4): a history Bundle whose
    first entry is the status Parameters (backport-subscription-status-r4) of the Subscription and this event.

    ``empty``: that entry only, and the event names no resource. ``id-only``: the event's focus references the
    stored resource, and a second entry carries its fullUrl with the request that wrote it and our response.
    ``full-resource``: that entry also holds the resource. There is no SubscriptionTopic (the criteria are R4 search
    criteria), so the status has no ``topic``. References are absolute under ``base``; relative without one.
    """
    prefix = f"{base.rstrip('/')}/" if base else ""
    subscription = f"{prefix}Subscription/{rule.id}"
    focus = f"{prefix}{stored.res_type}/{stored.res_id}"
    status_id = str(uuid.uuid4())
    parts: list[dict[str, Any]] = [
        {"name": "event-number", "valueString": str(event)},
        {"name": "timestamp", "valueInstant": instant(stored.last_updated)},
    ]
    if rule.content != "empty":  # an empty payload SHALL NOT reference resources (IG, Payload Types)
        parts.append({"name": "focus", "valueReference": {"reference": focus}})
    status = {
        "resourceType": "Parameters",
        "id": status_id,
        "meta": {"profile": [STATUS_PROFILE]},
        "parameter": [
            {"name": "subscription", "valueReference": {"reference": subscription}},
            {"name": "status", "valueCode": "active"},
            {"name": "type", "valueCode": "event-notification"},
            {"name": "events-since-subscription-start", "valueString": str(event)},
            {"name": "notification-event", "part": parts},
        ],
    }
    # A history Bundle needs request and response on every entry (bdl-3, bdl-4); the status entry's request is the
    # $status call it answers (IG, Notifications).
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"urn:uuid:{status_id}",
            "resource": status,
            "request": {"method": "GET", "url": f"{subscription}/$status"},
            "response": {"status": "200 OK"},
        }
    ]
    if rule.content != "empty":
        method = stored.method if stored.method in _RESPONSE_STATUS else "POST" if stored.version_id == 1 else "PUT"
        entry: dict[str, Any] = {"fullUrl": focus}
        if rule.content == "full-resource":
            entry["resource"] = resource
        url = stored.res_type if method == "POST" else f"{stored.res_type}/{stored.res_id}"
        entry["request"] = {"method": method, "url": url}
        entry["response"] = {
            "status": _RESPONSE_STATUS[method],
            "etag": f'W/"{stored.version_id}"',
            "lastModified": instant(stored.last_updated),
        }
        entries.append(entry)
    return {
        "resourceType": "Bundle",
        # One id per notification: a subscriber that gets it twice (a retry after a lost answer) can tell.
        "id": str(uuid.uuid4()),
        "meta": {"profile": [NOTIFICATION_PROFILE]},
        "type": "history",
        "timestamp": instant(now_us() if now is None else now),
        "entry": entries,
    }


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
    content: str | None = None
    try:
        content = payload_content(subscription)
    except Invalid as error:
        issues += error.issues
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
        content=content,
    )


def payload_content(subscription: dict[str, Any]) -> str | None:
    """The code of the backport payload-content extension on ``channel.payload`` (None without it); Invalid if it
    is repeated, has no known code, or sits anywhere else (where it would be ignored and the subscriber surprised)."""
    issues: list[Issue] = []
    channel = subscription.get("channel")
    channel = channel if isinstance(channel, dict) else {}
    for where, owner in (("Subscription", subscription), ("Subscription.channel", channel)):
        extensions = owner.get("extension")
        for index, extension in enumerate(extensions if isinstance(extensions, list) else []):
            if isinstance(extension, dict) and extension.get("url") == PAYLOAD_CONTENT:
                issues.append(
                    Issue(
                        "invalid",
                        "the backport payload-content extension belongs on Subscription.channel.payload "
                        "(channel._payload in JSON)",
                        f"{where}.extension[{index}]",
                    )
                )
    element = channel.get("_payload")
    extensions = element.get("extension") if isinstance(element, dict) else None
    found: list[tuple[int, Any]] = [
        (index, extension)
        for index, extension in enumerate(extensions if isinstance(extensions, list) else [])
        if isinstance(extension, dict) and extension.get("url") == PAYLOAD_CONTENT
    ]
    for index, _ in found[1:]:
        issues.append(Issue("invalid", "the payload-content extension is given more than once", _payload_path(index)))
    code: str | None = None
    if found:
        index, extension = found[0]
        code = extension.get("valueCode")
        if code not in PAYLOAD_CONTENTS:
            shown = repr(code)[:64] if "valueCode" in extension else "none"
            issues.append(
                Issue(
                    "code-invalid",
                    f"payload content {shown} is not known; use one of {', '.join(PAYLOAD_CONTENTS)} (valueCode)",
                    f"{_payload_path(index)}.valueCode",
                )
            )
    if issues:
        raise Invalid(issues)
    return code


def _payload_path(index: int) -> str:
    return f"Subscription.channel.payload.extension[{index}]"


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
    if res_type in UNNOTIFIED:
        raise invalid(f"no Subscription is notified of {res_type} (the audit trail is for administrators)", "forbidden")
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

    def __init__(self, repository: Repository, *, base: Callable[[], str | None] = lambda: None) -> None:
        self.repository = repository
        # The public base of this FHIR API for the references of a notification (runtime.public_base), or None:
        # references stay relative.
        self.base = base
        self._lock = threading.Lock()
        self._cached: tuple[tuple[int, int], dict[str, list[Rule]]] | None = None
        # Per transaction: the rules it uses; a transaction that wrote a Subscription reads its own view.
        self._per_tx: weakref.WeakKeyDictionary[Any, dict[str, list[Rule]]] = weakref.WeakKeyDictionary()
        self._wrote: weakref.WeakSet[Any] = weakref.WeakSet()

    def on_write(self, tx: WriteTx, resource: dict[str, Any], stored: StoredResource) -> None:
        if stored.res_type in UNNOTIFIED:
            return
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
        base: str | None = None
        for rule in rules:
            if rule.end is not None and rule.end <= now:
                continue
            if not self._matches(tx, rule, stored.res_id):
                continue
            event = 0
            if rule.content is not None:
                # events-since-subscription-start and event-number: counted in the write's transaction, so a
                # rolled-back write takes no number. Plain R4 notifications carry none.
                event = tx.next_subscription_event(rule.id, now)
                base = base or self.base()
            outbox.enqueue(
                tx,
                PARTNER_PREFIX + rule.id,
                stored.res_type[:32],  # record_kind is 32 characters; one R4 type name is 33
                stored.res_id,
                "notification",
                notification_payload(rule, resource, stored, event=event, base=base, now=now),
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
            token = tx.type_versions("Subscription")
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
