"""Rest-hook notifications end to end: a write that matches a Subscription is delivered by the worker to the
subscriber's endpoint, with its headers, as an empty POST or as a PUT of the resource (R4 subscription.html), or as a
Subscriptions R5 Backport notification Bundle when the channel asks for one."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from iop_fhir.runtime import run_worker

CONTRACT = Path(__file__).resolve().parents[3] / "shared" / "contract"


class Receiver:
    """A subscriber's endpoint: records what arrives, answers with the next scripted status (200 by default)."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                receiver.received.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "authorization": self.headers.get("Authorization"),
                        "content_type": self.headers.get("Content-Type"),
                        "body": json.loads(body) if body else None,
                    }
                )
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PUT = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    endpoint = Receiver()
    yield endpoint
    endpoint.server.shutdown()
    endpoint.server.server_close()


PAYLOAD_CONTENT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content"


def subscription(endpoint: str, *, payload: bool, content: str | None = None) -> dict[str, Any]:
    channel: dict[str, Any] = {"type": "rest-hook", "endpoint": endpoint, "header": ["Authorization: Bearer hook-1"]}
    if payload:
        channel["payload"] = "application/fhir+json"
    if content is not None:
        channel["_payload"] = {"extension": [{"url": PAYLOAD_CONTENT, "valueCode": content}]}
    return {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "positive cannabinoid screens",
        "criteria": "Observation?code=http://loinc.org|18282-4",
        "channel": channel,
    }


def positive_screen_session(client: Any) -> dict[str, Any]:
    enrollment = json.loads((CONTRACT / "enrollment.json").read_text(encoding="utf-8"))
    enrollment_id = client.post("/iop/enrollments", json=enrollment).get_json()["id"]
    session = json.loads(
        (CONTRACT / "session.json").read_text(encoding="utf-8").replace("{{enrollment_id}}", enrollment_id)
    )
    response = client.post("/iop/sessions", json=session)
    assert response.status_code == 201, response.get_json()
    body: dict[str, Any] = response.get_json()
    return body


def cannabinoid_screen(client: Any, session: dict[str, Any]) -> str:
    """The reference (Type/id) of the session's cannabinoid screen Observation, the one the Subscription follows."""
    return next(
        r
        for r in session["fhir"]
        if r.startswith("Observation/")
        and client.get(f"/fhir/{r}").get_json()["code"]["coding"][0]["code"] == "18282-4"
    )


@pytest.mark.parametrize("payload", [False, True], ids=["empty", "full-resource"])
def test_matching_write_reaches_the_subscriber_once_with_its_headers(
    app: Any, client: Any, receiver: Receiver, payload: bool
) -> None:
    assert client.post("/fhir/Subscription", json=subscription(receiver.url, payload=payload)).status_code == 201
    session = positive_screen_session(client)
    store = app.extensions["iop_fhir.store"]
    run_worker(app.config["IOP_FHIR"], once=True, store=store)
    assert len(receiver.received) == 1
    arrived = receiver.received[0]
    assert arrived["authorization"] == "Bearer hook-1"
    screen = cannabinoid_screen(client, session)
    if payload:
        assert (arrived["method"], arrived["path"]) == ("PUT", f"/hook/{screen}")
        assert arrived["body"]["id"] == screen.split("/")[1]
    else:
        assert (arrived["method"], arrived["path"], arrived["body"]) == ("POST", "/hook", None)
    rows, _ = store.deliveries(partner_id=None, status="delivered")
    assert len(rows) == 1


@pytest.mark.parametrize("content", ["id-only", "full-resource"])
def test_a_backport_subscriber_receives_a_history_bundle_with_the_focus(
    app: Any, client: Any, receiver: Receiver, content: str
) -> None:
    body = subscription(receiver.url, payload=True, content=content)
    assert client.post("/fhir/Subscription", json=body).status_code == 201
    session = positive_screen_session(client)
    run_worker(app.config["IOP_FHIR"], once=True, store=app.extensions["iop_fhir.store"])
    (arrived,) = receiver.received
    assert (arrived["method"], arrived["path"]) == ("POST", "/hook")
    assert (arrived["authorization"], arrived["content_type"]) == ("Bearer hook-1", "application/fhir+json")
    bundle = arrived["body"]
    assert (bundle["resourceType"], bundle["type"]) == ("Bundle", "history")
    status, focus_entry = bundle["entry"]
    assert status["resource"]["resourceType"] == "Parameters"
    (event,) = [p["part"] for p in status["resource"]["parameter"] if p["name"] == "notification-event"]
    screen = f"{app.config['IOP_FHIR'].base_url}/{cannabinoid_screen(client, session)}"
    assert {"name": "focus", "valueReference": {"reference": screen}} in event
    assert {"name": "event-number", "valueString": "1"} in event
    assert focus_entry["fullUrl"] == screen
    if content == "full-resource":
        assert f"{app.config['IOP_FHIR'].base_url}/Observation/{focus_entry['resource']['id']}" == screen
    else:
        assert "resource" not in focus_entry


def test_a_failing_subscriber_is_retried_and_nothing_is_dropped(
    app: Any, client: Any, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    from iop_fhir.exchange import outbox

    monkeypatch.setattr(outbox, "BASE_DELAY_S", 0.01)
    assert client.post("/fhir/Subscription", json=subscription(receiver.url, payload=False)).status_code == 201
    receiver.statuses = [503, 500]
    positive_screen_session(client)
    store = app.extensions["iop_fhir.store"]
    for _ in range(50):
        run_worker(app.config["IOP_FHIR"], once=True, store=store)
        if len(receiver.received) == 3:
            break
        threading.Event().wait(0.05)
    rows, _ = store.deliveries()
    assert [(r.status, r.attempts) for r in rows] == [("delivered", 3)]
