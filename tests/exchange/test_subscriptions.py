"""R4 rest-hook Subscriptions: checked when written, activated, and notified through the outbox in the transaction
of the write that matched them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from iop_fhir.app import create_app
from iop_fhir.config import Settings
from iop_fhir.store.base import Delivery

ENDPOINT = "https://hooks.example.org/iop/notify"
LOINC = "http://loinc.org"


def subscription(criteria: str = f"Observation?code={LOINC}|1975-2", **channel: Any) -> dict[str, Any]:
    return {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "Follow bilirubin results",
        "criteria": criteria,
        "channel": {"type": "rest-hook", "endpoint": ENDPOINT, **channel},
    }


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
