"""Race safety of conditional create and If-Match updates, with threads and with separate processes, on both
databases (DESIGN.md: conditional writes are made race-safe by the database, not by search-then-insert)."""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from flask.testing import FlaskClient

from iop_fhir.app import create_app
from iop_fhir.config import Settings

FHIR = "application/fhir+json"
MRN = "urn:oid:2.16.840.1.113883.19.5|MRN-RACE"
PATIENT = orjson.dumps(
    {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5", "value": "MRN-RACE"}],
        "name": [{"family": "Race"}],
    }
)


def _conditional_create(client: FlaskClient) -> tuple[int, str]:
    response = client.post(
        "/fhir/Patient", data=PATIENT, headers={"Content-Type": FHIR, "If-None-Exist": f"identifier={MRN}"}
    )
    return response.status_code, response.get_json()["id"]


def _count_patients(client: FlaskClient) -> int:
    bundle = client.get(f"/fhir/Patient?identifier={MRN}&_total=accurate").get_json()
    return int(bundle["total"])


def test_200_concurrent_conditional_creates_in_threads_leave_one_resource(client: FlaskClient) -> None:
    barrier = threading.Barrier(50)

    def attempt(_: int) -> tuple[int, str]:
        try:
            barrier.wait(timeout=30)
        except threading.BrokenBarrierError:
            pass
        return _conditional_create(client.application.test_client())

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(attempt, range(200)))
    statuses = [status for status, _ in results]
    assert statuses.count(201) == 1
    assert statuses.count(200) == 199
    assert len({res_id for _, res_id in results}) == 1
    assert _count_patients(client) == 1


def _process_worker(url: str, attempts: int, start: Any, out: Any) -> None:
    from tests.auth import TokenClient  # a spawned process has not run conftest.py

    app = create_app(Settings(database_url=url, base_url="http://testserver/fhir"))
    app.test_client_class = TokenClient
    client = app.test_client()
    start.wait(60)
    out.put([_conditional_create(client) for _ in range(attempts)])


def test_200_concurrent_conditional_creates_in_processes_leave_one_resource(client: FlaskClient, db_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=_process_worker, args=(db_url, 50, start, out)) for _ in range(4)]
    for w in workers:
        w.start()
    start.set()
    results = [r for _ in workers for r in out.get(timeout=300)]
    for w in workers:
        w.join(60)
    statuses = [status for status, _ in results]
    assert len(results) == 200
    assert statuses.count(201) == 1
    assert len({res_id for _, res_id in results}) == 1
    assert _count_patients(client) == 1


def test_concurrent_if_match_updates_never_lose_an_update(client: FlaskClient) -> None:
    created = client.post(
        "/fhir/Basic",
        data=orjson.dumps(
            {
                "resourceType": "Basic",
                "code": {"text": "counter"},
                "extension": [{"url": "http://example.org/counter", "valueInteger": 0}],
            }
        ),
        headers={"Content-Type": FHIR},
    ).get_json()
    path = f"/fhir/Basic/{created['id']}"

    def increment(_: int) -> int:
        local = client.application.test_client()
        conflicts = 0
        while True:
            current = local.get(path)
            body = current.get_json()
            body["extension"][0]["valueInteger"] += 1
            response = local.put(
                path,
                data=orjson.dumps(body),
                headers={"Content-Type": FHIR, "If-Match": current.headers["ETag"]},
            )
            if response.status_code == 200:
                return conflicts
            assert response.status_code == 412
            conflicts += 1

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(increment, range(40)))
    final = client.get(path).get_json()
    assert final["extension"][0]["valueInteger"] == 40
    assert final["meta"]["versionId"] == "41"
