"""R4 rest-hook Subscriptions: checked when written, activated, and notified through the outbox in the transaction
of the write that matched them; with the Subscriptions R5 Backport payload-content extension, as notification
Bundles."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from iop_fhir import runtime
from iop_fhir.app import create_app
from iop_fhir.config import Settings
from iop_fhir.exchange import subscriptions
from iop_fhir.store.base import Delivery, StoredResource

ENDPOINT = "https://hooks.example.org/iop/notify"
LOINC = "http://loinc.org"
BASE = "http://testserver/fhir"  # the base_url of the test settings
PAYLOAD_CONTENT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content"
VALIDATOR = Path(__file__).resolve().parents[3] / "shared" / "tools" / "fhir-validate"


def subscription(criteria: str = f"Observation?code={LOINC}|1975-2", **channel: Any) -> dict[str, Any]:
    return {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "Follow bilirubin results",
        "criteria": criteria,
        "channel": {"type": "rest-hook", "endpoint": ENDPOINT, **channel},
    }


def backport(content: Any, **channel: Any) -> dict[str, Any]:
    """A Subscription asking for backport notifications: ``content`` as the payload-content extension's valueCode."""
    return subscription(
        **{"payload": "application/fhir+json", **channel},
        _payload={"extension": [{"url": PAYLOAD_CONTENT, "valueCode": content}]},
    )


def observation(code: str = "1975-2", status: str = "final") -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": status,
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "valueQuantity": {"value": 1.2, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
    }


def subscribe(client: FlaskClient, body: dict[str, Any] | None = None) -> str:
    response = client.post("/fhir/Subscription", json=body or subscription())
    assert response.status_code == 201, response.get_json()
    sub_id: str = response.get_json()["id"]
    return sub_id


def notifications(app: Flask, sub_id: str) -> list[Delivery]:
    rows, _ = app.extensions["iop_fhir.store"].deliveries(partner_id=f"subscription:{sub_id}")
    return list(rows)


def issue(response: Any) -> tuple[int, str, list[str]]:
    first = response.get_json()["issue"][0]
    return response.status_code, first["code"], first.get("expression", [])


def test_a_requested_subscription_becomes_active(client: FlaskClient) -> None:
    sub_id = subscribe(client)
    stored = client.get(f"/fhir/Subscription/{sub_id}").get_json()
    assert stored["status"] == "active"
    assert stored["meta"]["versionId"] == "2"
    assert client.get(f"/fhir/Subscription/{sub_id}/_history/1").get_json()["status"] == "requested"


def test_a_write_matching_the_criteria_enqueues_one_notification(app: Flask, client: FlaskClient) -> None:
    sub_id = subscribe(client)
    created = client.post("/fhir/Observation", json=observation()).get_json()
    rows = notifications(app, sub_id)
    assert len(rows) == 1
    row = rows[0]
    assert (row.kind, row.status, row.record_kind, row.record_id) == (
        "notification",
        "pending",
        "Observation",
        created["id"],
    )


def test_a_write_not_matching_the_criteria_enqueues_nothing(app: Flask, client: FlaskClient) -> None:
    sub_id = subscribe(client)
    assert client.post("/fhir/Observation", json=observation(code="718-7")).status_code == 201
    assert client.post("/fhir/Patient", json={"resourceType": "Patient"}).status_code == 201
    assert notifications(app, sub_id) == []


def test_every_stored_version_that_matches_is_notified(app: Flask, client: FlaskClient) -> None:
    sub_id = subscribe(client, subscription(f"Observation?code={LOINC}|1975-2&status=final"))
    created = client.post("/fhir/Observation", json=observation(status="preliminary")).get_json()
    assert notifications(app, sub_id) == []
    amended = {**observation(status="final"), "id": created["id"]}
    assert client.put(f"/fhir/Observation/{created['id']}", json=amended).status_code == 200
    assert client.put(f"/fhir/Observation/{created['id']}", json=amended).status_code == 200
    assert len(notifications(app, sub_id)) == 2


def test_without_payload_the_notification_is_a_post_without_body(app: Flask, client: FlaskClient) -> None:
    sub_id = subscribe(client, subscription(header=["Authorization: Bearer synthetic-token", "X-Source: iop"]))
    client.post("/fhir/Observation", json=observation())
    (row,) = notifications(app, sub_id)
    assert row.payload == {
        "method": "POST",
        "url": ENDPOINT,
        "headers": {"Authorization": "Bearer synthetic-token", "X-Source": "iop"},
        "body": None,
    }


def test_with_a_json_payload_the_full_resource_is_put_at_the_endpoint(app: Flask, client: FlaskClient) -> None:
    sub_id = subscribe(client, subscription(payload="application/fhir+json", header=["X-Source: iop"]))
    created = client.post("/fhir/Observation", json=observation()).get_json()
    (row,) = notifications(app, sub_id)
    assert row.payload["method"] == "PUT"
    assert row.payload["url"] == f"{ENDPOINT}/Observation/{created['id']}"
    assert row.payload["headers"] == {"X-Source": "iop", "Content-Type": "application/fhir+json"}
    assert row.payload["body"] == client.get(f"/fhir/Observation/{created['id']}").get_json()


def test_the_notification_rolls_back_with_a_failed_transaction(app: Flask, client: FlaskClient) -> None:
    sub_id = subscribe(client)
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": observation(), "request": {"method": "POST", "url": "Observation"}},
            {  # If-Match on a resource that does not exist: 412, and the whole transaction is undone
                "resource": {"resourceType": "Patient", "id": "nobody"},
                "request": {"method": "PUT", "url": "Patient/nobody", "ifMatch": 'W/"3"'},
            },
        ],
    }
    response = client.post("/fhir", json=bundle)
    assert response.status_code == 412
    assert notifications(app, sub_id) == []
    assert client.get(f"/fhir/Observation?code={LOINC}|1975-2").get_json().get("entry") is None


def test_subscriptions_that_are_off_or_deleted_notify_nothing(app: Flask, client: FlaskClient) -> None:
    off = subscribe(client, {**subscription(), "status": "off"})
    deleted = subscribe(client)
    client.post("/fhir/Observation", json=observation())
    assert notifications(app, off) == []
    assert len(notifications(app, deleted)) == 1
    assert client.delete(f"/fhir/Subscription/{deleted}").status_code in (200, 204)
    client.post("/fhir/Observation", json=observation())
    assert len(notifications(app, deleted)) == 1


def test_a_subscription_past_its_end_notifies_nothing(app: Flask, client: FlaskClient) -> None:
    sub_id = subscribe(client, {**subscription(), "end": "2020-01-01T00:00:00Z"})
    client.post("/fhir/Observation", json=observation())
    assert notifications(app, sub_id) == []


@pytest.fixture
def second_app(settings: Settings) -> Iterator[Flask]:
    app = create_app(settings)
    yield app
    app.extensions["iop_fhir.store"].close()


def test_a_subscription_written_by_another_process_is_matched(
    app: Flask, client: FlaskClient, second_app: Flask
) -> None:
    other = second_app.test_client()
    other.post("/fhir/Observation", json=observation())  # the other app has looked: no Subscriptions then
    sub_id = subscribe(client)
    other.post("/fhir/Observation", json=observation())
    assert len(notifications(app, sub_id)) == 1
    assert client.delete(f"/fhir/Subscription/{sub_id}").status_code in (200, 204)
    other.post("/fhir/Observation", json=observation())
    assert len(notifications(app, sub_id)) == 1


@pytest.mark.parametrize(
    ("criteria", "code"),
    [
        ("Observation?no-such-parameter=1", "not-supported"),
        ("Observaton?code=1975-2", "invalid"),
        ("?code=1975-2", "invalid"),
        ("Observation?code=1975-2&_count=10", "invalid"),
        ("Observation?date=not-a-date", "invalid"),
    ],
)
def test_criteria_this_server_cannot_search_are_refused(
    app: Flask, client: FlaskClient, criteria: str, code: str
) -> None:
    response = client.post("/fhir/Subscription", json=subscription(criteria))
    assert issue(response) == (400, code, ["Subscription.criteria"])
    assert client.get("/fhir/Subscription").get_json().get("entry") is None


@pytest.mark.parametrize(
    ("channel", "code", "expression"),
    [
        ({"type": "websocket"}, "not-supported", "Subscription.channel.type"),
        ({"endpoint": "mailto:someone@example.org"}, "required", "Subscription.channel.endpoint"),
        ({"payload": "application/fhir+xml"}, "not-supported", "Subscription.channel.payload"),
        ({"header": ["no colon here"]}, "value", "Subscription.channel.header[0]"),
    ],
)
def test_a_channel_this_server_cannot_serve_is_refused(
    client: FlaskClient, channel: dict[str, Any], code: str, expression: str
) -> None:
    body = subscription()
    body["channel"] = {**body["channel"], **channel}
    response = client.post("/fhir/Subscription", json=body)
    assert issue(response) == (400, code, [expression])


def test_an_update_that_breaks_a_subscription_is_refused_and_keeps_it(client: FlaskClient) -> None:
    sub_id = subscribe(client)
    broken = {**subscription("Observation?bogus=1"), "id": sub_id, "status": "active"}
    response = client.put(f"/fhir/Subscription/{sub_id}", json=broken)
    assert issue(response) == (400, "not-supported", ["Subscription.criteria"])
    assert client.get(f"/fhir/Subscription/{sub_id}").get_json()["criteria"] == f"Observation?code={LOINC}|1975-2"


def test_a_subscription_id_too_long_for_the_outbox_is_refused(client: FlaskClient) -> None:
    long_id = "s" * 52
    response = client.put(f"/fhir/Subscription/{long_id}", json={**subscription(), "id": long_id})
    assert issue(response) == (400, "value", ["Subscription.id"])


# -- Subscriptions R5 Backport payload content (empty, id-only, full-resource) ------------------------------------


def status_of(bundle: dict[str, Any]) -> dict[str, Any]:
    """The first entry's Parameters as name -> value, notification-event as its parts' name -> value."""
    first = bundle["entry"][0]["resource"]
    assert first["resourceType"] == "Parameters"
    found: dict[str, Any] = {}
    for parameter in first["parameter"]:
        if "part" in parameter:
            found[parameter["name"]] = {
                part["name"]: next(v for k, v in part.items() if k.startswith("value")) for part in parameter["part"]
            }
        else:
            found[parameter["name"]] = next(v for k, v in parameter.items() if k.startswith("value"))
    return found


@pytest.mark.parametrize("content", ["id-only", "full-resource"])
def test_a_backport_subscription_posts_a_history_bundle_naming_the_focus(
    app: Flask, client: FlaskClient, content: str
) -> None:
    sub_id = subscribe(client, backport(content, header=["X-Source: iop", "Content-Type: text/plain"]))
    created = client.post("/fhir/Observation", json=observation()).get_json()
    (row,) = notifications(app, sub_id)
    assert (row.payload["method"], row.payload["url"]) == ("POST", ENDPOINT)
    assert row.payload["headers"] == {"X-Source": "iop", "Content-Type": "application/fhir+json"}
    bundle = row.payload["body"]
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "history"
    assert len(bundle["entry"]) == 2
    focus = f"{BASE}/Observation/{created['id']}"
    assert status_of(bundle) == {
        "subscription": {"reference": f"{BASE}/Subscription/{sub_id}"},
        "status": "active",
        "type": "event-notification",
        "events-since-subscription-start": "1",
        "notification-event": {
            "event-number": "1",
            "timestamp": created["meta"]["lastUpdated"],
            "focus": {"reference": focus},
        },
    }
    assert bundle["entry"][0]["request"] == {"method": "GET", "url": f"{BASE}/Subscription/{sub_id}/$status"}
    entry = bundle["entry"][1]
    assert entry["fullUrl"] == focus
    assert entry["request"] == {"method": "POST", "url": "Observation"}
    assert entry["response"]["status"] == "201 Created"
    assert entry["response"]["etag"] == 'W/"1"'
    if content == "full-resource":
        assert entry["resource"] == client.get(f"/fhir/Observation/{created['id']}").get_json()
    else:
        assert "resource" not in entry


def test_an_empty_backport_notification_holds_the_status_only_and_names_no_resource(
    app: Flask, client: FlaskClient
) -> None:
    # No payload mime type: the Bundle still goes as FHIR JSON.
    body = backport("empty")
    del body["channel"]["payload"]
    sub_id = subscribe(client, body)
    client.post("/fhir/Observation", json=observation())
    (row,) = notifications(app, sub_id)
    assert row.payload["method"] == "POST"
    assert row.payload["headers"] == {"Content-Type": "application/fhir+json"}
    bundle = row.payload["body"]
    assert [e["resource"]["resourceType"] for e in bundle["entry"]] == ["Parameters"]
    event = status_of(bundle)["notification-event"]
    assert event["event-number"] == "1"
    assert "focus" not in event


def test_an_update_is_notified_as_the_put_that_made_the_version(app: Flask, client: FlaskClient) -> None:
    sub_id = subscribe(client, backport("id-only"))
    created = client.post("/fhir/Observation", json=observation()).get_json()
    client.put(f"/fhir/Observation/{created['id']}", json={**observation(), "id": created["id"]})
    entry = notifications(app, sub_id)[1].payload["body"]["entry"][1]
    assert entry["request"] == {"method": "PUT", "url": f"Observation/{created['id']}"}
    assert (entry["response"]["status"], entry["response"]["etag"]) == ("200 OK", 'W/"2"')


def test_backport_events_are_numbered_per_subscription_and_a_rolled_back_write_takes_none(
    app: Flask, client: FlaskClient
) -> None:
    first = subscribe(client, backport("id-only"))
    client.post("/fhir/Observation", json=observation())
    second = subscribe(client, backport("full-resource"))
    failed = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": observation(), "request": {"method": "POST", "url": "Observation"}},
            {
                "resource": {"resourceType": "Patient", "id": "nobody"},
                "request": {"method": "PUT", "url": "Patient/nobody", "ifMatch": 'W/"3"'},
            },
        ],
    }
    assert client.post("/fhir", json=failed).status_code == 412
    client.post("/fhir/Observation", json=observation())
    client.post("/fhir/Observation", json=observation())

    def numbers(sub_id: str) -> list[tuple[str, str]]:
        return [
            (
                status_of(r.payload["body"])["events-since-subscription-start"],
                status_of(r.payload["body"])["notification-event"]["event-number"],
            )
            for r in notifications(app, sub_id)
        ]

    assert numbers(first) == [("1", "1"), ("2", "2"), ("3", "3")]
    assert numbers(second) == [("1", "1"), ("2", "2")]


def test_a_plain_r4_subscription_keeps_no_event_counter(app: Flask, client: FlaskClient) -> None:
    sub_id = subscribe(client)
    client.post("/fhir/Observation", json=observation())
    assert notifications(app, sub_id)[0].payload["body"] is None
    assert app.extensions["iop_fhir.store"].subscription_events(sub_id) is None


def test_without_a_request_the_base_comes_from_the_environment_else_references_are_relative(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IOP_FHIR_BASE_URL", "https://iop.example.org/fhir/")
    assert runtime.public_base(Settings.from_env())() == "https://iop.example.org/fhir"
    monkeypatch.delenv("IOP_FHIR_BASE_URL")
    assert runtime.public_base(Settings.from_env())() is None
    rule = subscriptions.rule_of({**backport("id-only"), "id": "labs"})
    stored = StoredResource("Observation", "obs-1", 1, 1_700_000_000_000_000, False, b"{}", "POST")
    bundle = subscriptions.notification_bundle(rule, {}, stored, event=4, base=None)
    assert status_of(bundle)["subscription"] == {"reference": "Subscription/labs"}
    assert status_of(bundle)["notification-event"]["focus"] == {"reference": "Observation/obs-1"}


def test_without_a_configured_base_the_request_base_is_used(settings: Settings) -> None:
    app = create_app(replace(settings, base_url=""))
    try:
        client = app.test_client()
        sub_id = subscribe(client, backport("id-only"))
        created = client.post("/fhir/Observation", json=observation()).get_json()
        (row,) = notifications(app, sub_id)
        assert row.payload["body"]["entry"][1]["fullUrl"] == f"http://localhost/fhir/Observation/{created['id']}"
    finally:
        app.extensions["iop_fhir.store"].close()


@pytest.mark.parametrize(
    ("payload_element", "code", "expression"),
    [
        (
            {"extension": [{"url": PAYLOAD_CONTENT, "valueCode": "summary"}]},
            "code-invalid",
            "Subscription.channel.payload.extension[0].valueCode",
        ),
        (
            {"extension": [{"url": PAYLOAD_CONTENT, "valueString": "id-only"}]},
            "code-invalid",
            "Subscription.channel.payload.extension[0].valueCode",
        ),
        (
            {
                "extension": [
                    {"url": "https://iop-fhir.org/fhir/StructureDefinition/other", "valueCode": "x"},
                    {"url": PAYLOAD_CONTENT, "valueCode": "id-only"},
                    {"url": PAYLOAD_CONTENT, "valueCode": "empty"},
                ]
            },
            "invalid",
            "Subscription.channel.payload.extension[2]",
        ),
    ],
)
def test_a_payload_content_this_server_cannot_honour_is_refused(
    client: FlaskClient, payload_element: dict[str, Any], code: str, expression: str
) -> None:
    body = subscription(payload="application/fhir+json", _payload=payload_element)
    response = client.post("/fhir/Subscription", json=body)
    assert issue(response) == (400, code, [expression])
    assert client.get("/fhir/Subscription").get_json().get("entry") is None


def test_a_payload_content_extension_elsewhere_than_on_payload_is_refused(client: FlaskClient) -> None:
    body = subscription(extension=[{"url": PAYLOAD_CONTENT, "valueCode": "id-only"}])
    response = client.post("/fhir/Subscription", json=body)
    assert issue(response) == (400, "invalid", ["Subscription.channel.extension[0]"])


def test_backport_notification_bundles_pass_the_independent_validator(
    sqlite_app: Flask, sqlite_client: FlaskClient, tmp_path: Path
) -> None:
    ids = {content: subscribe(sqlite_client, backport(content)) for content in ("empty", "id-only", "full-resource")}
    created = sqlite_client.post("/fhir/Observation", json=observation()).get_json()
    sqlite_client.put(f"/fhir/Observation/{created['id']}", json={**observation(), "id": created["id"]})
    out = tmp_path / "notifications"
    out.mkdir()
    for content, sub_id in ids.items():
        for n, row in enumerate(notifications(sqlite_app, sub_id)):
            (out / f"{content}-{n}.json").write_text(json.dumps(row.payload["body"]), encoding="utf-8")
    assert len(list(out.iterdir())) == 6
    result = subprocess.run([str(VALIDATOR), str(out)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
