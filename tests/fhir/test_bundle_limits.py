"""How much one batch or transaction Bundle may hold (IOP_FHIR_MAX_BUNDLE_ENTRIES), and what a batch commits when
its writes run in chunks of one database transaction each (fhir/transaction.py ``_batch``), on both databases:
every entry still succeeds or fails on its own, seeing exactly the entries before it
(https://hl7.org/fhir/R4/http.html#brules)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient

from iop_fhir.config import Settings
from iop_fhir.fhir import transaction as bundles
from iop_fhir.store.base import AuditQuery, AuditRow, StoredResource, WriteTx
from tests.fhir.test_transaction import count, create, entry, issue, patient, post, read, transaction

LIMIT = 6


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(
        database_url=db_url, base_url="http://testserver/fhir", seed_conformance=False, max_bundle_entries=LIMIT
    )


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches written three entries to a transaction, so that a handful of entries spans several chunks."""
    monkeypatch.setattr(bundles, "BATCH_CHUNK", 3)


def statuses(body: dict[str, Any]) -> list[str]:
    return [e["response"]["status"] for e in body["entry"]]


def audit_rows(app: Flask, action: str) -> list[AuditRow]:
    app.extensions["iop_fhir.audit"].flush()
    rows, _ = app.extensions["iop_fhir.store"].audit_rows(AuditQuery(where=((("action", action),),), count=1000))
    return list(rows)


# -- the entry limit -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["batch", "transaction"])
def test_a_bundle_over_the_entry_limit_answers_413_and_writes_nothing(client: FlaskClient, kind: str) -> None:
    bundle = transaction(*[entry("POST", "Patient", patient(f"L-{i}")) for i in range(LIMIT + 1)], kind=kind)

    status, outcome = post(client, bundle)

    assert status == 413
    assert issue(outcome) == ("too-costly", ["Bundle.entry"])
    diagnostics = outcome["issue"][0]["diagnostics"]
    assert f"{LIMIT + 1} entries" in diagnostics
    assert f"at most {LIMIT}" in diagnostics
    assert "IOP_FHIR_MAX_BUNDLE_ENTRIES" in diagnostics
    assert "split" in diagnostics
    assert count(client, "Patient") == 0


@pytest.mark.parametrize("kind", ["batch", "transaction"])
def test_a_bundle_of_exactly_the_entry_limit_is_accepted(client: FlaskClient, kind: str) -> None:
    bundle = transaction(*[entry("POST", "Patient", patient(f"L-{i}")) for i in range(LIMIT)], kind=kind)

    status, body = post(client, bundle)

    assert status == 200
    assert statuses(body) == ["201 Created"] * LIMIT
    assert count(client, "Patient") == LIMIT


def test_the_entry_limit_is_read_from_its_environment_variable() -> None:
    assert Settings.from_env({"IOP_FHIR_MAX_BUNDLE_ENTRIES": "250"}).max_bundle_entries == 250


# -- a batch in chunks ---------------------------------------------------------------------------------------


@pytest.mark.usefixtures("small_chunks")
def test_a_failing_batch_entry_rolls_back_alone_and_the_others_commit(client: FlaskClient) -> None:
    kept = create(client, patient("KEPT", "Before"))
    stale = create(client, patient("STALE", "Before"))
    renamed = {**patient("KEPT", "After"), "id": kept["id"]}
    status, body = post(
        client,
        transaction(
            entry("POST", "Patient", patient("B-0")),
            entry("PUT", f"Patient/{kept['id']}", renamed),
            # The version check fails inside the chunk's transaction, after two entries of it have run.
            entry("PUT", f"Patient/{stale['id']}", {**patient("STALE", "Lost"), "id": stale["id"]}, ifMatch='W/"7"'),
            entry("POST", "Patient", patient("B-3")),
            entry("DELETE", f"Patient/{stale['id']}", ifMatch='W/"9"'),
            entry("POST", "Patient", patient("B-5")),
            kind="batch",
        ),
    )

    assert status == 200
    assert statuses(body) == [
        "201 Created",
        "200 OK",
        "412 Precondition Failed",
        "201 Created",
        "412 Precondition Failed",
        "201 Created",
    ]
    assert issue(body["entry"][2]["response"]["outcome"])[1] == ["Bundle.entry[2].request.ifMatch"]
    assert issue(body["entry"][4]["response"]["outcome"])[1] == ["Bundle.entry[4].request.ifMatch"]
    assert count(client, "Patient") == 5  # kept, stale and the three posted
    # The entries run again after the failure are written once: the update is version 2, not 3.
    assert read(client, f"Patient/{kept['id']}")["meta"]["versionId"] == "2"
    assert read(client, f"Patient/{kept['id']}")["name"][0]["family"] == "After"
    assert read(client, f"Patient/{stale['id']}")["meta"]["versionId"] == "1"
    assert read(client, f"Patient/{stale['id']}")["name"][0]["family"] == "Before"
    for created in (0, 3, 5):
        location = body["entry"][created]["response"]["location"]
        assert read(client, location.split("/_history/")[0])["meta"]["versionId"] == "1"


@pytest.mark.usefixtures("small_chunks")
def test_conditional_batch_entries_see_the_entries_before_them_in_and_across_chunks(client: FlaskClient) -> None:
    status, body = post(
        client,
        transaction(
            entry("POST", "Patient", patient("C-1", "First")),
            entry("POST", "Patient", patient("C-1", "Again"), ifNoneExist="identifier=urn:example:mrn|C-1"),
            entry("PUT", "Patient?identifier=urn:example:mrn|C-2", patient("C-2", "Made")),
            # The next chunk: its conditions find what the first one committed.
            entry("PUT", "Patient?identifier=urn:example:mrn|C-2", patient("C-2", "Changed")),
            entry("POST", "Patient", patient("C-2", "Twice"), ifNoneExist="identifier=urn:example:mrn|C-2"),
            entry("DELETE", "Patient?identifier=urn:example:mrn|C-1"),
            kind="batch",
        ),
    )

    assert status == 200
    assert statuses(body) == ["201 Created", "200 OK", "201 Created", "200 OK", "200 OK", "204 No Content"]
    assert body["entry"][1]["resource"]["id"] == body["entry"][0]["resource"]["id"]
    assert body["entry"][3]["resource"]["id"] == body["entry"][2]["resource"]["id"]
    assert body["entry"][3]["resource"]["meta"]["versionId"] == "2"
    assert count(client, "Patient") == 1
    assert count(client, "Patient", "family=Changed") == 1


@pytest.mark.usefixtures("small_chunks")
def test_a_batch_read_sees_the_writes_of_the_entries_before_it(client: FlaskClient) -> None:
    status, body = post(
        client,
        transaction(
            entry("POST", "Patient", patient("R-1")),
            entry("GET", "Patient?identifier=urn:example:mrn|R-1"),
            entry("POST", "Patient", patient("R-1")),
            entry("GET", "Patient?identifier=urn:example:mrn|R-1&_summary=count"),
            kind="batch",
        ),
    )

    assert status == 200
    assert statuses(body) == ["201 Created", "200 OK", "201 Created", "200 OK"]
    assert [e["resource"]["id"] for e in body["entry"][1]["resource"]["entry"]] == [body["entry"][0]["resource"]["id"]]
    assert body["entry"][3]["resource"]["total"] == 2


@pytest.mark.usefixtures("small_chunks")
def test_each_written_batch_entry_has_its_own_audit_row_once(app: Flask, client: FlaskClient) -> None:
    stale = create(client, patient("AUD", "Before"))
    status, body = post(
        client,
        transaction(
            entry("POST", "Patient", patient("A-0")),
            entry("POST", "Patient", patient("A-1")),
            entry("DELETE", f"Patient/{stale['id']}", ifMatch='W/"4"'),
            entry("POST", "Patient", patient("A-3")),
            kind="batch",
        ),
    )

    assert status == 200
    assert statuses(body) == ["201 Created", "201 Created", "412 Precondition Failed", "201 Created"]
    written = [body["entry"][i]["response"]["location"].split("/_history/")[0] for i in (0, 1, 3)]
    rows = audit_rows(app, "batch")
    assert sorted(row.entities for row in rows) == sorted((reference,) for reference in written)
    assert {row.outcome for row in rows} == {"0"}


@pytest.mark.usefixtures("small_chunks")
def test_an_unexpected_error_in_a_chunk_runs_its_entries_one_at_a_time(app: Flask, client: FlaskClient) -> None:
    """An error that is no entry's refusal (a deadlock between two writers, say) does not fail the batch when the
    entries succeed alone."""
    failures: list[str] = []

    def flaky(tx: WriteTx, resource: dict[str, Any], stored: StoredResource) -> None:
        if resource.get("identifier", [{}])[0].get("value") == "U-1" and not failures:
            failures.append(stored.res_id)
            raise RuntimeError("deadlock detected")

    app.extensions["iop_fhir.repository"].add_write_hook("flaky", flaky)
    status, body = post(
        client,
        transaction(*[entry("POST", "Patient", patient(f"U-{i}")) for i in range(3)], kind="batch"),
    )

    assert status == 200
    assert statuses(body) == ["201 Created"] * 3
    assert len(failures) == 1
    assert count(client, "Patient") == 3


# -- a transaction -------------------------------------------------------------------------------------------


def test_a_transaction_with_a_failing_entry_writes_nothing(app: Flask, client: FlaskClient) -> None:
    stale = create(client, patient("TX", "Before"))
    bundle = transaction(
        entry("POST", "Patient", patient("T-0")),
        entry("POST", "Patient", patient("T-1")),
        entry("PUT", f"Patient/{stale['id']}", {**patient("TX", "Lost"), "id": stale["id"]}, ifMatch='W/"5"'),
        entry("POST", "Patient", patient("T-3")),
    )

    response = client.post("/fhir", data=orjson.dumps(bundle), content_type="application/fhir+json")

    assert response.status_code == 412
    assert issue(response.get_json()) == ("conflict", ["Bundle.entry[2].request.ifMatch"])
    assert count(client, "Patient") == 1
    assert read(client, f"Patient/{stale['id']}")["meta"]["versionId"] == "1"
    assert [row.outcome for row in audit_rows(app, "transaction")] == ["4"]
