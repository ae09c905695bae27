"""/iop/deliveries on both databases: listing with filters, reading one without its PHI, retrying dead or blocked
deliveries, and OperationOutcomes for everything else."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from iop_fhir.exchange import outbox
from iop_fhir.r4.instants import instant, now_us
from iop_fhir.store.sql import SqlStore

SECOND = 1_000_000
PHI = "Synthetic-Okafor"
MRN = "MRN-000123"
BUNDLE = {
    "resourceType": "Bundle",
    "type": "transaction",
    "entry": [
        {
            "fullUrl": "urn:uuid:5b7f1c3e-0d4e-4c1a-9a53-3f7c2d7e9a10",
            "resource": {"resourceType": "Patient", "name": [{"family": PHI}]},
            "request": {"method": "PUT", "url": f"Patient?identifier=urn:oid:2.16.840.1.113883.19.5|{MRN}"},
        },
        {
            "resource": {"resourceType": "CarePlan", "status": "active", "subject": {"reference": "urn:uuid:x"}},
            "request": {"method": "PUT", "url": "CarePlan?identifier=https://iop-fhir.org/fhir/sid/iop-record|d"},
        },
    ],
}
OUTCOME = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid"}]}
DEAD_ERROR = {"status": 422, "retryable": False, "message": "answered 422", "outcome": OUTCOME, "retry_after": None}


@pytest.fixture
def store(app: Flask) -> SqlStore:
    store: SqlStore = app.extensions["iop_fhir.store"]
    return store


def add(
    store: SqlStore,
    *,
    partner: str = "passaic-valley-recovery",
    record: tuple[str, str] = ("discharge", "d1"),
    kind: str = "bundle",
    payload: dict[str, Any] | None = None,
    blocked: str | None = None,
    now: int | None = None,
) -> str:
    with store.write() as tx:
        return outbox.enqueue(
            tx,
            partner,
            record[0],
            record[1],
            kind,
            payload or outbox.bundle_payload(BUNDLE),
            blocked=blocked,
            now=now,
        )


def kill(store: SqlStore, delivery_id: str) -> None:
    """Make a delivery dead as a worker would after a permanent failure."""
    (claimed,) = store.claim("w1", now_us(), 60, 1)
    assert claimed.id == delivery_id
    assert store.failed(delivery_id, "w1", now_us(), DEAD_ERROR, None)


def test_a_delivery_is_shown_with_its_state_and_a_summary_never_its_body(client: FlaskClient, store: SqlStore) -> None:
    created = now_us()
    delivery_id = add(store, now=created)
    response = client.get(f"/iop/deliveries/{delivery_id}")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.get_json() == {
        "id": delivery_id,
        "partner": "passaic-valley-recovery",
        "record": {"kind": "discharge", "id": "d1"},
        "kind": "bundle",
        "status": "pending",
        "attempts": 0,
        "next_attempt": instant(created),
        "last_error": None,
        "payload": {"method": "POST", "url": "", "entries": 2, "resource_types": ["CarePlan", "Patient"]},
        "response": None,
        "created": instant(created),
        "updated": instant(created),
        "delivered_at": None,
    }
    assert PHI not in response.get_data(as_text=True)
    assert MRN not in response.get_data(as_text=True)


def test_a_notification_shows_its_method_and_url_without_the_query(client: FlaskClient, store: SqlStore) -> None:
    payload = {"method": "PUT", "url": f"Patient?identifier=urn:oid:1.2|{MRN}", "body": {"resourceType": "Patient"}}
    delivery_id = add(store, kind="notification", payload=payload)
    shown = client.get(f"/iop/deliveries/{delivery_id}").get_json()
    assert shown["payload"] == {"method": "PUT", "url": "Patient", "resource_type": "Patient"}


def test_deliveries_are_listed_oldest_first_and_filtered(client: FlaskClient, store: SqlStore) -> None:
    start = now_us()
    a = add(store, partner="p1", record=("discharge", "d1"), now=start + 1)
    b = add(store, partner="p2", record=("discharge", "d1"), now=start + 2)
    c = add(store, partner="p1", record=("treatment-plan", "tp1"), now=start + 3)
    d = add(store, partner="p1", record=("discharge", "d2"), now=start + 4, blocked="no active consent")

    def listed(query: str) -> tuple[list[str], int]:
        response = client.get(f"/iop/deliveries{query}")
        assert response.status_code == 200
        body = response.get_json()
        return [item["id"] for item in body["items"]], body["total"]

    assert listed("") == ([a, b, c, d], 4)
    assert listed("?partner=p1") == ([a, c, d], 3)
    assert listed("?record=discharge/d1") == ([a, b], 2)
    assert listed("?record=treatment-plan/tp1") == ([c], 1)
    assert listed("?partner=p1&status=blocked") == ([d], 1)
    assert listed("?status=delivered") == ([], 0)
    assert listed("?partner=p1&offset=1&count=1") == ([c], 3)
    body = client.get("/iop/deliveries?count=2").get_json()
    assert (body["offset"], body["count"], len(body["items"])) == (0, 2, 2)


def test_dead_deliveries_are_listed_with_their_error_and_stay_after_a_successful_retry(
    client: FlaskClient, store: SqlStore
) -> None:
    delivery_id = add(store)
    kill(store, delivery_id)
    dead = client.get("/iop/deliveries?status=dead").get_json()
    assert dead["total"] == 1
    assert dead["items"][0]["last_error"] == DEAD_ERROR
    assert dead["items"][0]["next_attempt"] is None

    retried = client.post(f"/iop/deliveries/{delivery_id}/retry")
    assert retried.status_code == 200
    body = retried.get_json()
    assert (body["status"], body["attempts"], body["last_error"]) == ("pending", 1, DEAD_ERROR)
    assert body["next_attempt"] is not None

    (again,) = store.claim("w2", now_us(), 60, 1)
    store.delivered(again.id, "w2", now_us(), {"resourceType": "Bundle", "type": "transaction-response", "entry": []})
    delivered = client.get(f"/iop/deliveries/{delivery_id}").get_json()
    assert (delivered["status"], delivered["attempts"]) == ("delivered", 2)
    assert delivered["delivered_at"] is not None
    assert client.get("/iop/deliveries").get_json()["total"] == 1


def test_a_blocked_delivery_can_be_retried(client: FlaskClient, store: SqlStore) -> None:
    delivery_id = add(store, blocked="no active consent covers this recipient")
    assert client.get(f"/iop/deliveries/{delivery_id}").get_json()["status"] == "blocked"
    response = client.post(f"/iop/deliveries/{delivery_id}/retry")
    assert response.status_code == 200
    assert response.get_json()["status"] == "pending"


@pytest.mark.parametrize("state", ["pending", "delivering", "delivered"])
def test_only_dead_or_blocked_deliveries_can_be_retried(client: FlaskClient, store: SqlStore, state: str) -> None:
    delivery_id = add(store)
    if state != "pending":
        store.claim("w1", now_us(), 60, 1)
    if state == "delivered":
        store.delivered(delivery_id, "w1", now_us(), None)
    response = client.post(f"/iop/deliveries/{delivery_id}/retry")
    assert response.status_code == 409
    assert response.mimetype == "application/json"
    (issue,) = response.get_json()["issue"]
    assert (issue["code"], issue["expression"]) == ("conflict", ["status"])
    assert f"is {state}; only dead or blocked" in issue["diagnostics"]
    assert client.get(f"/iop/deliveries/{delivery_id}").get_json()["status"] == state


@pytest.mark.parametrize("delivery_id", ["00000000-0000-0000-0000-000000000000", "not%00an-id", "x" * 65])
def test_an_unknown_delivery_is_404(client: FlaskClient, delivery_id: str) -> None:
    for response in (
        client.get(f"/iop/deliveries/{delivery_id}"),
        client.post(f"/iop/deliveries/{delivery_id}/retry"),
    ):
        assert response.status_code == 404
        (issue,) = response.get_json()["issue"]
        assert (issue["code"], issue["expression"]) == ("not-found", ["id"])


@pytest.mark.parametrize(
    ("query", "expression", "message"),
    [
        ("?status=lost", "status", "status must be one of pending, delivering, delivered, dead, blocked"),
        (
            "?status=late",
            "status",
            "status must be one of pending, delivering, delivered, dead, blocked, superseded, overdue",
        ),
        ("?record=discharge", "record", "record must be <kind>/<id>"),
        ("?record=discharge/a/b", "record", "record must be <kind>/<id>"),
        ("?partner=has%20space", "partner", "partner must be a partner id"),
        ("?count=-1", "count", "count must be a non-negative integer"),
        ("?count=1001", "count", "count must be at most 1000"),
        ("?offset=x", "offset", "offset must be a non-negative integer"),
        ("?patient=p1", "patient", "unknown query parameter 'patient'"),
        ("?status=dead&status=blocked", "status", "status is given more than once"),
    ],
)
def test_a_bad_list_parameter_is_a_400_naming_it(
    client: FlaskClient, query: str, expression: str, message: str
) -> None:
    response = client.get(f"/iop/deliveries{query}")
    assert response.status_code == 400
    (issue,) = response.get_json()["issue"]
    assert (issue["code"], issue["expression"]) == ("invalid", [expression])
    assert issue["diagnostics"].startswith(message)


def test_the_openapi_document_lists_the_delivery_operations(app: Flask) -> None:
    paths = app.extensions["iop_fhir.api"].spec.to_dict()["paths"]
    assert set(paths["/iop/deliveries"]) == {"get"}
    assert "get" in paths["/iop/deliveries/{delivery_id}"]
    assert "post" in paths["/iop/deliveries/{delivery_id}/retry"]
    assert set(paths["/iop/deliveries/{delivery_id}/retry"]["post"]["responses"]) >= {"200", "404", "409"}


# -- overdue transitions ---------------------------------------------------------------------------------------------

DAY = 86_400 * SECOND


def _contract(kind: str, enrollment_id: str = "") -> dict[str, Any]:
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "shared" / "contract" / f"{kind}.json"
    payload: dict[str, Any] = json.loads(path.read_text(encoding="utf-8").replace("{{enrollment_id}}", enrollment_id))
    return payload


def _transition(client: FlaskClient) -> dict[str, Any]:
    """A discharge with a referral to passaic-valley-recovery, queued for it."""
    client.post("/iop/partners", json=_contract("partner"))
    enrollment_id = client.post("/iop/enrollments", json=_contract("enrollment")).get_json()["id"]
    assert client.post("/iop/treatment-plans", json=_contract("treatment-plan", enrollment_id)).status_code == 201
    response = client.post("/iop/discharges", json=_contract("discharge", enrollment_id))
    assert response.status_code == 201, response.get_json()
    body: dict[str, Any] = response.get_json()
    return body


def _later(monkeypatch: pytest.MonkeyPatch, days: float) -> None:
    """Today is ``days`` days from now, for the overdue rule."""
    from iop_fhir.exchange import transitions
    from iop_fhir.iop import deliveries

    then = now_us() + int(days * DAY)
    monkeypatch.setattr(deliveries, "now_us", lambda: then)
    monkeypatch.setattr(transitions, "now_us", lambda: then)


def test_a_transition_not_accepted_after_the_configured_days_is_listed_as_overdue(
    client: FlaskClient, store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    discharge = _transition(client)
    assert client.get("/iop/deliveries?status=overdue").get_json()["items"] == []
    shown = client.get(f"/iop/discharges/{discharge['id']}").get_json()["transition"]
    assert shown["overdue"] is False
    [row] = store.deliveries(record_id=discharge["id"])[0]
    assert shown["accept_by"] == instant(row.created + 7 * DAY)

    _later(monkeypatch, 6.9)
    assert client.get("/iop/deliveries?status=overdue").get_json()["total"] == 0
    _later(monkeypatch, 7.1)
    listed = client.get("/iop/deliveries?status=overdue").get_json()
    assert (listed["total"], [d["id"] for d in listed["items"]]) == (1, [row.id])
    assert listed["items"][0]["record"] == {"kind": "discharge", "id": discharge["id"]}
    assert client.get(f"/iop/discharges/{discharge['id']}").get_json()["transition"]["overdue"] is True
    # the other filters still apply
    assert client.get("/iop/deliveries?status=overdue&partner=someone-else").get_json()["total"] == 0
    assert client.get(f"/iop/deliveries?status=overdue&record=discharge/{discharge['id']}").get_json()["total"] == 1
    assert client.get("/iop/deliveries?status=overdue&record=enrollment/e1").get_json()["total"] == 0


def test_an_accepted_or_retracted_transition_is_not_overdue(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import orjson

    accepted = _transition(client)
    task_ref = next(r for r in accepted["fhir"] if r.startswith("Task/"))
    task = client.get(f"/fhir/{task_ref}").get_json()
    task["status"] = "accepted"
    repository = app.extensions["iop_fhir.repository"]
    with repository.store.write() as tx:
        repository.update_in(tx, "Task", task["id"], orjson.loads(orjson.dumps(task)))
    _later(monkeypatch, 30)
    assert client.get("/iop/deliveries?status=overdue").get_json()["total"] == 0
    assert client.get(f"/iop/discharges/{accepted['id']}").get_json()["transition"]["overdue"] is False
    assert client.post(f"/iop/discharges/{accepted['id']}/retract").status_code in (200, 204)
    assert client.get("/iop/deliveries?status=overdue").get_json()["total"] == 0


def test_the_overdue_days_are_configurable(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from iop_fhir.app import create_app
    from iop_fhir.config import Settings

    settings = Settings.from_env(
        {"IOP_FHIR_TRANSITION_OVERDUE_DAYS": "30"}, database_url=sqlite_url, seed_conformance=False
    )
    assert settings.transition_overdue_days == 30
    app = create_app(settings)
    try:
        client = app.test_client()
        discharge = _transition(client)
        _later(monkeypatch, 8)
        assert client.get("/iop/deliveries?status=overdue").get_json()["total"] == 0
        assert client.get(f"/iop/discharges/{discharge['id']}").get_json()["transition"]["overdue"] is False
        _later(monkeypatch, 31)
        assert client.get("/iop/deliveries?status=overdue").get_json()["total"] == 1
    finally:
        app.extensions["iop_fhir.store"].close()
