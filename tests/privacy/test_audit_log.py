"""The audit log, on SQLite and PostgreSQL: written from what the repository did, a write's row in the write's own
transaction, a read's row group-committed without a write transaction of the request, a partner's row committed
before its response is released (for every request, one that found nothing too), and read back by administrators as
AuditEvent resources at /fhir/AuditEvent (search by every parameter the CapabilityStatement lists)."""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from iop_fhir.privacy import audit
from iop_fhir.r4.ids import time_ordered_id
from iop_fhir.r4.indexing import date_range
from iop_fhir.store import schema
from iop_fhir.store.base import AuditQuery, AuditRow
from tests.auth import admin_token, mint
from tests.privacy.scenario import FHIR, PARTNER, as_client, issue

VALIDATOR = Path(__file__).resolve().parents[3] / "shared" / "tools" / "fhir-validate"
AUDIT_PARAMS = ["_id", "action", "agent", "date", "entity", "outcome", "patient", "subtype", "type"]


def stored_rows(app: Flask, **where: str) -> list[AuditRow]:
    """The rows committed to the database now (nothing is flushed first)."""
    conditions = tuple(((field, value),) for field, value in where.items())
    rows, _ = app.extensions["iop_fhir.store"].audit_rows(AuditQuery(where=conditions, count=1000))
    return list(rows)


def flushed_rows(app: Flask, **where: str) -> list[AuditRow]:
    app.extensions["iop_fhir.audit"].flush()
    return stored_rows(app, **where)


def create(client: FlaskClient, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"/fhir/{body['resourceType']}", data=orjson.dumps(body), content_type=FHIR)
    assert response.status_code == 201, response.get_json()
    created: dict[str, Any] = response.get_json()
    return created


@pytest.fixture
def admin(app: Flask) -> FlaskClient:
    return as_client(app, admin_token(app))


@pytest.fixture
def write_transactions(app: Flask) -> Iterator[Callable[[], int]]:
    """How many write transactions the test's own thread opened on the store (the audit log's thread aside)."""
    store = app.extensions["iop_fhir.store"]
    me = threading.get_ident()
    opened: list[str] = []

    def counting(name: str) -> Any:
        original = getattr(store, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == me:
                opened.append(name)
            return original(*args, **kwargs)

        return wrapper

    for name in ("write", "writing", "append_audit"):
        setattr(store, name, counting(name))
    yield lambda: len(opened)
    for name in ("write", "writing", "append_audit"):
        delattr(store, name)


# -- reads and writes -------------------------------------------------------------------------------------------


def test_a_read_takes_no_write_transaction_of_its_own_and_its_row_follows_by_group_commit(
    app: Flask, client: FlaskClient, write_transactions: Callable[[], int]
) -> None:
    patient = create(client, {"resourceType": "Patient", "name": [{"family": "Groupcommit"}]})
    before = write_transactions()

    assert client.get(f"/fhir/Patient/{patient['id']}").status_code == 200
    assert client.get("/fhir/Patient?family=Groupcommit").status_code == 200

    assert write_transactions() == before
    reads = [r for r in flushed_rows(app, client_id="test-program") if r.action in ("read", "search")]
    assert [(r.action, r.patient, r.entities) for r in sorted(reads, key=lambda r: r.action)] == [
        ("read", f"Patient/{patient['id']}", (f"Patient/{patient['id']}",)),
        ("search", f"Patient/{patient['id']}", (f"Patient/{patient['id']}",)),
    ]
    [searched] = [r for r in reads if r.action == "search"]
    assert searched.query == "/fhir/Patient?family=Groupcommit"


def test_a_compartment_search_is_audited_as_a_search_with_its_query_and_what_it_returned(
    app: Flask, client: FlaskClient
) -> None:
    patient = create(client, {"resourceType": "Patient", "name": [{"family": "Compartment"}]})
    observation = create(
        client,
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "craving"},
            "subject": {"reference": f"Patient/{patient['id']}"},
        },
    )
    assert client.get(f"/fhir/Patient/{patient['id']}/Observation?status=final").status_code == 200
    [searched] = [r for r in flushed_rows(app, action="search") if "/Observation" in (r.query or "")]
    assert searched.query == f"/fhir/Patient/{patient['id']}/Observation?status=final"
    assert searched.entities == (f"Observation/{observation['id']}",)
    assert searched.patient == f"Patient/{patient['id']}"


def test_a_write_and_its_audit_row_commit_in_one_transaction(app: Flask, client: FlaskClient) -> None:
    queued: list[AuditRow] = []
    writer = app.extensions["iop_fhir.audit"]
    original = writer.append
    writer.append = lambda rows: (queued.extend(rows), original(rows))[1]

    patient = create(client, {"resourceType": "Patient", "name": [{"family": "Together"}]})

    # Committed with the write, not queued: there before anything is flushed.
    [row] = stored_rows(app, action="create")
    assert (row.outcome, row.patient, row.entities) == ("0", f"Patient/{patient['id']}", (f"Patient/{patient['id']}",))
    assert row.client_id == "test-program"
    assert queued == []


def test_a_write_that_rolls_back_takes_its_audit_row_with_it(app: Flask, client: FlaskClient) -> None:
    def fail_at_commit(tx: Any, resource: dict[str, Any], stored: Any) -> None:
        def boom() -> None:
            raise RuntimeError("the commit fails after the audit row was added")

        tx.before_commit.append(boom)

    app.extensions["iop_fhir.repository"].add_write_hook("fails-at-commit", fail_at_commit)

    response = client.post("/fhir/Patient", data=orjson.dumps({"resourceType": "Patient"}), content_type=FHIR)

    assert response.status_code == 500
    assert stored_rows(app, action="create", outcome="0") == []
    assert [r.outcome for r in flushed_rows(app, action="create")] == ["8"]  # the failure, audited as such
    with app.extensions["iop_fhir.store"].engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(schema.resources)).scalar_one() == 0


def test_a_transaction_that_fails_leaves_only_its_failure(app: Flask, client: FlaskClient) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
            {
                "resource": {"resourceType": "Patient", "id": "x"},
                "request": {"method": "PUT", "url": "Patient/x", "ifMatch": 'W/"7"'},
            },
        ],
    }
    assert client.post("/fhir", data=orjson.dumps(bundle), content_type=FHIR).status_code == 412
    assert [(r.action, r.outcome) for r in flushed_rows(app, action="transaction")] == [("transaction", "4")]


@pytest.mark.parametrize("kind", ["transaction", "batch"])
def test_what_a_bundle_reads_by_id_and_version_is_in_its_audit_row(app: Flask, client: FlaskClient, kind: str) -> None:
    patient = create(client, {"resourceType": "Patient", "name": [{"family": "Bundled"}]})
    reference = f"Patient/{patient['id']}"
    bundle = {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [
            {"request": {"method": "GET", "url": reference}},
            {"request": {"method": "GET", "url": f"{reference}/_history/1"}},
        ],
    }
    response = client.post("/fhir", data=orjson.dumps(bundle), content_type=FHIR)

    assert response.status_code == 200
    assert [e["response"]["status"] for e in response.get_json()["entry"]] == ["200 OK", "200 OK"]
    [row] = flushed_rows(app, action=kind)  # a batch is audited as one (action E, subtype batch)
    assert (row.outcome, row.patient, row.entities) == ("0", reference, (reference,))


def test_validate_and_every_step_of_an_export_are_audited_with_their_path(app: Flask, client: FlaskClient) -> None:
    create(client, {"resourceType": "Patient", "name": [{"family": "Exported"}]})
    body = orjson.dumps({"resourceType": "Patient", "gender": "nope"})
    assert client.post("/fhir/Patient/$validate", data=body, content_type=FHIR).status_code == 200
    exporter = app.extensions["iop_fhir.exports"]
    exporter.background = False
    kicked = client.get("/fhir/$export?_type=Patient", headers={"Prefer": "respond-async"})
    assert kicked.status_code == 202
    status = kicked.headers["Content-Location"].split("/fhir", 1)[1]
    exporter.run_due()
    manifest = client.get(f"/fhir{status}").get_json()
    [item] = manifest["output"]
    file_path = "/fhir" + item["url"].split("/fhir", 1)[1]
    assert client.get(file_path).status_code == 200
    assert client.delete(f"/fhir{status}").status_code == 202

    rows = flushed_rows(app)
    operations = sorted((r.action, r.outcome, unquote(r.query or "")) for r in rows if r.query and "$" in r.query)
    assert operations == sorted(
        [
            ("operation", "0", "/fhir/Patient/$validate?"),
            ("operation", "0", f"/fhir{status}?"),
            ("operation", "0", f"/fhir{status}?"),
            ("export", "0", f"{file_path}?"),
        ]
    )
    rendered = {
        r.action: audit.render(r) for r in rows if r.query and ("$validate" in r.query or "$export-file" in r.query)
    }
    assert rendered["operation"]["subtype"][0]["code"] == "operation"
    assert rendered["export"]["type"]["code"] == "110106"


def test_audit_events_are_never_stored_as_resources(app: Flask, client: FlaskClient, admin: FlaskClient) -> None:
    create(client, {"resourceType": "Patient"})
    client.get("/fhir/Patient")
    assert admin.get("/fhir/AuditEvent").status_code == 200
    app.extensions["iop_fhir.audit"].flush()
    with app.extensions["iop_fhir.store"].engine.connect() as conn:
        for table in (schema.resources, schema.history, *schema.INDEX_TABLES.values()):
            found = conn.execute(select(func.count()).where(table.c.res_type == "AuditEvent")).scalar_one()
            assert found == 0, table.name


# -- a partner's requests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/fhir/Patient?identifier=urn:probe|never-issued",
        "/fhir/Patient?_summary=count",
        "/fhir/Observation?_summary=count&code=8867-4",
        "/fhir/Patient/not-a-patient-of-yours",
        "/fhir/Patient/not-a-patient-of-yours/_history",
    ],
    ids=["empty-search", "count", "count-of-nothing", "404-read", "404-history"],
)
def test_every_partner_request_is_audited_before_its_response_is_released(
    app: Flask, program: dict[str, Any], path: str
) -> None:
    response = program["partner"].get(path)

    assert response.status_code in (200, 404)
    # Committed when the response came back: nothing flushed.
    [row] = stored_rows(app, on_behalf_of=f"Organization/{PARTNER}")
    assert row.action in ("search", "read", "history")
    assert row.outcome == ("0" if response.status_code == 200 else "4")
    assert row.purpose == "TREAT"
    if "?" in path:
        assert row.query is not None and unquote(row.query) == path
    if response.status_code == 404:
        assert row.entities == ("Patient/not-a-patient-of-yours",) and row.patient is None


def test_a_partner_probe_for_a_hidden_patient_is_audited_like_one_for_a_patient_who_never_existed(
    app: Flask, program: dict[str, Any]
) -> None:
    hidden = program["b"]["patient"]
    partner = program["partner"]
    assert partner.get(f"/fhir/{hidden}").status_code == 404
    assert partner.get("/fhir/Patient/never-existed").status_code == 404
    rows = stored_rows(app, on_behalf_of=f"Organization/{PARTNER}")
    assert sorted((r.action, r.outcome, r.patient, r.entities) for r in rows) == sorted(
        [("read", "4", None, ("Patient/never-existed",)), ("read", "4", None, (hidden,))]
    )


def test_a_partner_search_leaves_one_row_per_patient_whose_records_it_received(
    app: Flask, program: dict[str, Any], client: FlaskClient
) -> None:
    partner = program["partner"]
    a = program["a"]["patient"]
    response = partner.get("/fhir/Encounter?_include=Encounter:subject")
    assert response.status_code == 200
    received = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in response.get_json()["entry"]}
    assert a in received

    [row] = stored_rows(app, on_behalf_of=f"Organization/{PARTNER}")
    assert row.patient == a
    assert set(row.entities) == received
    accounting = as_client(app, admin_token(app)).get(f"/iop/enrollments/{program['a']['enrollment']}/disclosures")
    [item] = accounting.get_json()["items"]
    assert item["audit_event"] == f"AuditEvent/{row.id}"
    assert set(item["resources"]) == received - {a}


def test_a_partner_read_fails_when_its_audit_row_cannot_be_committed(app: Flask, program: dict[str, Any]) -> None:
    store = app.extensions["iop_fhir.store"]

    def refused(rows: Any) -> None:
        raise ConnectionError("the database is gone")

    store.append_audit = refused
    app.config["PROPAGATE_EXCEPTIONS"] = False  # answered as in production, not raised into the test
    try:
        response = program["partner"].get(f"/fhir/{program['a']['patient']}")
    finally:
        del store.append_audit
    assert response.status_code == 500
    assert "Consentida" not in response.get_data(as_text=True)


# -- /fhir/AuditEvent ---------------------------------------------------------------------------------------------

T0 = date_range("2026-03-01T10:00:00Z")[0]
ROWS = [
    AuditRow("ev-1", T0, "read", "0", "emr", None, None, "Patient/p1", ("Patient/p1",)),
    AuditRow(
        "ev-2",
        T0 + 3_600_000_000,
        "search",
        "0",
        "peer-app",
        f"Organization/{PARTNER}",
        "TREAT",
        "Patient/p1",
        ("Observation/o1", "Observation/o2"),
        "/fhir/Observation?subject=Patient/p1",
    ),
    AuditRow("ev-3", T0 + 86_400_000_000, "create", "0", "emr", None, None, "Patient/p2", ("Encounter/e1",)),
    AuditRow("ev-4", T0 + 2 * 86_400_000_000, "read", "4", "peer-app", f"Organization/{PARTNER}", "TREAT", None, ()),
    AuditRow(
        "ev-5",
        T0 + 3 * 86_400_000_000,
        "disclose",
        "0",
        "iop-fhir-worker",
        "Organization/aftercare",
        "TREAT",
        "Patient/p2",
        ("CarePlan/c1",),
    ),
    AuditRow("ev-6", T0 + 4 * 86_400_000_000, "export", "0", "emr", None, None, None, ("Observation/o1",)),
]


@pytest.fixture
def logged(app: Flask) -> list[AuditRow]:
    app.extensions["iop_fhir.store"].append_audit(ROWS)
    return ROWS


def found(admin: FlaskClient, query: str) -> list[str]:
    """The ids of the events a search finds, of those the test logged (the admin's own searches are audited too)."""
    response = admin.get(f"/fhir/AuditEvent?{query}")
    assert response.status_code == 200, response.get_json()
    return [e["resource"]["id"] for e in response.get_json().get("entry", []) if e["resource"]["id"].startswith("ev-")]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("_id=ev-3", ["ev-3"]),
        ("date=2026-03-01", ["ev-2", "ev-1"]),
        ("date=2026-03-01T10:00:00Z", ["ev-1"]),
        ("date=gt2026-03-02", ["ev-6", "ev-5", "ev-4"]),
        ("date=ge2026-03-02", ["ev-6", "ev-5", "ev-4", "ev-3"]),
        ("date=lt2026-03-02", ["ev-2", "ev-1"]),
        ("date=le2026-03-02", ["ev-3", "ev-2", "ev-1"]),
        ("date=sa2026-03-03&date=eb2026-03-05", ["ev-5"]),
        ("date=ne2026-03-01", ["ev-6", "ev-5", "ev-4", "ev-3"]),
        ("patient=Patient/p1", ["ev-2", "ev-1"]),
        ("patient=p2", ["ev-5", "ev-3"]),
        ("agent=emr", ["ev-6", "ev-3", "ev-1"]),
        (f"agent=Organization/{PARTNER}", ["ev-4", "ev-2"]),
        ("agent=aftercare", ["ev-5"]),
        ("agent=iop-fhir-worker,peer-app", ["ev-5", "ev-4", "ev-2"]),
        ("entity=Observation/o1", ["ev-6", "ev-2"]),
        ("entity=Patient/p2", ["ev-5", "ev-3"]),
        ("action=C", ["ev-3"]),
        ("action=E", ["ev-2"]),
        ("action=R&agent=emr", ["ev-6", "ev-1"]),
        ("outcome=4", ["ev-4"]),
        ("type=110106", ["ev-6", "ev-5"]),
        ("type=http://terminology.hl7.org/CodeSystem/audit-event-type|rest&outcome=0", ["ev-3", "ev-2", "ev-1"]),
        ("subtype=search", ["ev-2"]),
        ("subtype=operation", ["ev-6"]),
        ("patient=p1&action=R", ["ev-1"]),
        ("_sort=date&agent=emr", ["ev-1", "ev-3", "ev-6"]),
    ],
)
def test_audit_events_are_searched_by_each_parameter(
    admin: FlaskClient, logged: list[AuditRow], query: str, expected: list[str]
) -> None:
    assert found(admin, query) == expected


def test_audit_event_search_pages_and_counts(admin: FlaskClient, logged: list[AuditRow]) -> None:
    first = admin.get("/fhir/AuditEvent?agent=emr&_count=2&_total=accurate").get_json()
    assert first["total"] == 3
    assert [e["resource"]["id"] for e in first["entry"]] == ["ev-6", "ev-3"]
    links = {link["relation"]: link["url"] for link in first["link"]}
    assert set(links) == {"self", "first", "next", "last"}
    following = admin.get(links["next"].removeprefix("http://testserver")).get_json()
    assert [e["resource"]["id"] for e in following["entry"]] == ["ev-1"]
    assert "next" not in {link["relation"] for link in following["link"]}
    counted = admin.get("/fhir/AuditEvent?agent=emr&_summary=count").get_json()
    assert counted["total"] == 3 and "entry" not in counted


def test_an_audit_event_reads_as_the_row_rendered(admin: FlaskClient, logged: list[AuditRow]) -> None:
    response = admin.get("/fhir/AuditEvent/ev-2")
    assert response.status_code == 200
    event = response.get_json()
    assert event["id"] == "ev-2"
    assert event["meta"]["lastUpdated"] == event["recorded"] == "2026-03-01T11:00:00.000000Z"
    assert event["meta"]["versionId"] == "1"
    assert event["subtype"][0]["code"] == "search" and event["action"] == "E"
    client, partner = event["agent"]
    assert client["who"]["identifier"]["value"] == "peer-app"
    assert partner["who"] == {"reference": f"Organization/{PARTNER}"}
    assert partner["type"]["coding"][0]["code"] == "IRCP"
    whats = [e.get("what", {}).get("reference") for e in event["entity"]]
    assert whats == ["Patient/p1", "Observation/o1", "Observation/o2", None]
    assert base64.b64decode(event["entity"][-1]["query"]).decode() == "/fhir/Observation?subject=Patient/p1"
    assert admin.get("/fhir/AuditEvent/ev-404").status_code == 404
    assert issue(admin.get("/fhir/AuditEvent/ev-404"))["code"] == "not-found"


def test_an_audit_event_has_one_version_read_by_vread_and_its_history(
    admin: FlaskClient, logged: list[AuditRow]
) -> None:
    event = admin.get("/fhir/AuditEvent/ev-2").get_json()
    vread = admin.get("/fhir/AuditEvent/ev-2/_history/1")
    assert vread.status_code == 200 and vread.get_json() == event
    for path in ("/fhir/AuditEvent/ev-2/_history/2", "/fhir/AuditEvent/ev-404/_history/1"):
        assert admin.get(path).status_code == 404, path
        assert issue(admin.get(path))["code"] == "not-found"
    history = admin.get("/fhir/AuditEvent/ev-2/_history").get_json()
    assert history["type"] == "history" and history["total"] == 1
    [entry] = history["entry"]
    assert entry["resource"] == event
    assert entry["request"] == {"method": "POST", "url": "AuditEvent"}
    assert admin.get("/fhir/AuditEvent/ev-404/_history").status_code == 404


def test_audit_events_have_no_type_history_and_are_not_found_through_other_paths(
    admin: FlaskClient, logged: list[AuditRow]
) -> None:
    """Each of these would find nothing in the resource store: refused as not supported, never answered empty."""
    response = admin.get("/fhir/AuditEvent/_history")
    assert response.status_code == 400 and issue(response)["code"] == "not-supported"
    for query in (
        "_revinclude=AuditEvent:entity",
        "_revinclude=AuditEvent:patient",
        "_include=Patient:link:AuditEvent",
    ):
        response = admin.get(f"/fhir/Patient?{query}")
        assert response.status_code == 400, query
        assert issue(response)["code"] == "not-supported"
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": "AuditEvent/ev-2"}},
            {"request": {"method": "GET", "url": "AuditEvent?patient=p1"}},
        ],
    }
    answered = admin.post("/fhir", data=orjson.dumps(bundle), content_type=FHIR).get_json()
    for entry in answered["entry"]:
        assert entry["response"]["status"].startswith("400")
        assert entry["response"]["outcome"]["issue"][0]["code"] == "not-supported"
    bundle["type"] = "transaction"
    response = admin.post("/fhir", data=orjson.dumps(bundle), content_type=FHIR)
    assert response.status_code == 400 and issue(response)["code"] == "not-supported"


@pytest.mark.parametrize(
    "query", ["address=x", "patient:missing=true", "patient.name=x", "_include=AuditEvent:patient", "_sort=action"]
)
def test_an_audit_event_search_the_log_cannot_answer_is_refused(admin: FlaskClient, query: str) -> None:
    response = admin.get(f"/fhir/AuditEvent?{query}")
    assert response.status_code == 400
    assert issue(response)["code"] == "not-supported"


def test_a_lenient_audit_event_search_drops_what_it_cannot_answer(admin: FlaskClient, logged: list[AuditRow]) -> None:
    response = admin.get("/fhir/AuditEvent?address=x&outcome=4", headers={"Prefer": "handling=lenient"})
    assert response.status_code == 200
    bundle = response.get_json()
    assert [e["resource"]["id"] for e in bundle["entry"] if e["search"]["mode"] == "match"] == ["ev-4"]
    assert "address" not in bundle["link"][0]["url"]
    [outcome] = [e for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert outcome["resource"]["issue"][0]["expression"] == ["address"]


def test_audit_events_are_for_administrators_and_written_by_the_service_alone(
    app: Flask, client: FlaskClient, admin: FlaskClient, program: dict[str, Any], logged: list[AuditRow]
) -> None:
    reader = as_client(app, mint(app, "system/AuditEvent.rs"))
    for someone in (client, reader, program["partner"]):
        for path in ("/fhir/AuditEvent", "/fhir/AuditEvent/ev-1", "/fhir/AuditEvent?patient=p1"):
            response = someone.get(path)
            assert response.status_code == 403, path
            assert issue(response)["code"] == "forbidden"
    event = admin.get("/fhir/AuditEvent/ev-1").get_json()
    for method, path in [("post", "/fhir/AuditEvent"), ("put", "/fhir/AuditEvent/ev-1")]:
        response = getattr(admin, method)(path, data=orjson.dumps(event), content_type=FHIR)
        assert response.status_code == 403, path
        assert issue(response)["code"] == "forbidden"
    assert admin.delete("/fhir/AuditEvent/ev-1").status_code == 403
    assert admin.get("/fhir/AuditEvent/ev-1").get_json() == event


def test_the_capability_statement_lists_exactly_the_audit_event_parameters_that_work(
    client: FlaskClient, admin: FlaskClient
) -> None:
    statement = client.get("/fhir/metadata").get_json()
    [entry] = [r for r in statement["rest"][0]["resource"] if r["type"] == "AuditEvent"]
    assert [p["name"] for p in entry["searchParam"]] == AUDIT_PARAMS
    assert [i["code"] for i in entry["interaction"]] == ["read", "vread", "history-instance", "search-type"]
    for param in entry["searchParam"]:
        assert admin.get(f"/fhir/AuditEvent?{param['name']}=x1").status_code in (200, 400)
        assert issue(admin.get(f"/fhir/AuditEvent?{param['name']}:missing=true"))["code"] == "not-supported"
    for name in ("address", "agent-name", "site", "policy", "source"):
        assert issue(admin.get(f"/fhir/AuditEvent?{name}=x"))["code"] == "not-supported"


@pytest.mark.peers
def test_rendered_audit_events_pass_the_independent_validator(
    app: Flask, client: FlaskClient, admin: FlaskClient, program: dict[str, Any], tmp_path: Path
) -> None:
    """Every shape the service writes: a write, a read, a search (with its query), a partner's disclosure and its
    failure, a transaction, an export and a delivery to a partner."""
    create(client, {"resourceType": "Patient", "name": [{"family": "Validated"}]})
    client.get("/fhir/Patient?family=Validated")
    program["partner"].get(f"/fhir/{program['a']['patient']}")
    program["partner"].get("/fhir/Patient/nobody")
    app.extensions["iop_fhir.store"].append_audit(ROWS)
    events = [e["resource"] for e in admin.get("/fhir/AuditEvent?_count=500").get_json()["entry"]]
    kinds = {(e["type"]["code"], (e.get("subtype") or [{}])[0].get("code"), e["outcome"]) for e in events}
    assert {("rest", "create", "0"), ("rest", "search", "0"), ("rest", "read", "4"), ("110106", None, "0")} <= kinds
    for event in events:
        (tmp_path / f"{event['id']}.json").write_text(json.dumps(event), encoding="utf-8")

    result = subprocess.run([str(VALIDATOR), str(tmp_path)], capture_output=True, text=True, check=False)

    assert result.returncode == 0, result.stdout + result.stderr
    assert sum(line.startswith("OK ") for line in result.stdout.splitlines()) == len(events), result.stdout


def test_new_rows_render_as_the_builder_shapes_them(app: Flask) -> None:
    agent: audit.Agent = {"client_id": "c1", "partner": "Organization/o1", "purpose": "TREAT"}
    row = audit.new_row("read", "0", agent, "Patient/p", ["Observation/x", "Observation/x"], recorded=T0)
    assert row.entities == ("Observation/x",)
    rendered = audit.render(row)
    built = audit.audit_event("read", "0", agent, "Patient/p", ["Observation/x"], when=rendered["recorded"])
    assert {k: v for k, v in rendered.items() if k not in ("id", "meta")} == {
        k: v for k, v in built.items() if k != "meta"
    }
    assert rendered["meta"] == {
        "versionId": "1",
        "lastUpdated": rendered["recorded"],
        "security": built["meta"]["security"],
    }
    with pytest.raises(ValueError):
        audit.new_row("read", "0", agent, "Group/g", [], recorded=T0)


def test_row_ids_are_version_7_uuids_that_sort_as_the_events_happened() -> None:
    ids = [time_ordered_id(recorded) for recorded in (T0, T0 + 1_000, T0 + 2_000, T0 + 86_400_000_000)]
    assert ids == sorted(ids)
    assert all(uuid.UUID(i).version == 7 and str(uuid.UUID(i)) == i for i in ids)
    assert len({time_ordered_id(T0) for _ in range(1000)}) == 1000


@pytest.mark.parametrize("order", ["", "&_sort=date", "&_sort=-date"])
def test_paging_audit_events_while_events_are_written_serves_each_event_of_the_start_once(
    admin: FlaskClient, logged: list[AuditRow], order: str
) -> None:
    start = [e["resource"]["id"] for e in admin.get(f"/fhir/AuditEvent?_count=1000{order}").get_json()["entry"]]
    assert {"ev-1", "ev-6"} <= set(start)
    seen: list[str] = []
    url: str | None = f"/fhir/AuditEvent?_count=2{order}"
    while url is not None:  # every page read is itself audited: events are written between the pages
        bundle = admin.get(url).get_json()
        seen += [e["resource"]["id"] for e in bundle.get("entry", [])]
        following = next((lk["url"] for lk in bundle["link"] if lk["relation"] == "next"), None)
        assert following is None or "_cursor=" in following
        url = None if following is None else following.removeprefix("http://testserver")
    assert len(seen) == len(set(seen))  # nothing repeated
    assert [i for i in seen if i in start] == start  # nothing skipped, in order


def test_an_audit_event_cursor_of_another_search_is_refused(admin: FlaskClient, logged: list[AuditRow]) -> None:
    forged = base64.urlsafe_b64encode(orjson.dumps([1, False, ["text"], "ev-1"])).decode().rstrip("=")
    response = admin.get(f"/fhir/AuditEvent?_cursor={forged}")
    assert response.status_code == 400
    issue = response.get_json()["issue"][0]
    assert (issue["code"], issue["expression"]) == ("invalid", ["_cursor"])
