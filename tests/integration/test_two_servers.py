"""Several stateless `iop-fhir serve` processes on one PostgreSQL database, as a network of sites runs the service:
a token minted once is honoured by both, what one writes the other reads, a search paged on one continues on the
other (the cursor holds the whole paging state), and concurrent conditional creates sent to both make one resource."""

from __future__ import annotations

import concurrent.futures
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from iop_fhir.app import create_app
from iop_fhir.config import Settings
from tests.auth import mint
from tests.live import serve

FHIR_JSON = "application/fhir+json"


@pytest.fixture
def servers(tmp_path: Path, postgres_url: str) -> Iterator[tuple[str, str, str]]:
    app = create_app(Settings(database_url=postgres_url, seed_conformance=False, token_lifetime=3600))
    token = mint(app, "system/*.cruds")
    app.extensions["iop_fhir.store"].close()
    env = {"IOP_FHIR_DATABASE_URL": postgres_url, "IOP_FHIR_SEED_CONFORMANCE": "false"}
    with serve(env, tmp_path / "a.log") as first, serve(env, tmp_path / "b.log") as second:
        yield first, second, token


def patient(family: str, mrn: str) -> dict[str, object]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5", "value": mrn}],
        "name": [{"family": family}],
    }


def test_what_one_server_writes_the_other_reads_with_the_same_token(servers: tuple[str, str, str]) -> None:
    first, second, token = servers
    headers = {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON}
    created = requests.post(f"{first}/fhir/Patient", json=patient("Sitea", "M-1"), headers=headers, timeout=30)
    assert created.status_code == 201
    read = requests.get(f"{second}/fhir/Patient/{created.json()['id']}", headers=headers, timeout=30)
    assert read.status_code == 200
    assert read.json()["name"] == [{"family": "Sitea"}]


def test_a_search_paged_on_one_server_continues_on_the_other(servers: tuple[str, str, str]) -> None:
    first, second, token = servers
    headers = {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON}
    family = f"Fam{uuid.uuid4().hex[:8]}"
    made = set()
    for n in range(7):
        response = requests.post(f"{first}/fhir/Patient", json=patient(family, f"P-{n}"), headers=headers, timeout=30)
        assert response.status_code == 201
        made.add(response.json()["id"])
    seen: list[str] = []
    url: str | None = f"{first}/fhir/Patient?family={family}&_count=3"
    hosts = [first, second]
    page = 0
    while url:
        bundle = requests.get(url, headers=headers, timeout=30).json()
        seen += [e["resource"]["id"] for e in bundle.get("entry", [])]
        following = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
        page += 1
        # the next page is asked of the other server: the link's path and query are the whole paging state
        url = None if following is None else hosts[page % 2] + following[following.index("/fhir/") :]
    assert sorted(seen) == sorted(made) and len(seen) == len(set(seen))


def test_conditional_creates_sent_to_both_servers_at_once_make_one_resource(servers: tuple[str, str, str]) -> None:
    first, second, token = servers
    mrn = f"C-{uuid.uuid4().hex[:8]}"
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": FHIR_JSON,
        "If-None-Exist": f"identifier=urn:oid:2.16.840.1.113883.19.5|{mrn}",
    }

    def create(base: str) -> int:
        return requests.post(f"{base}/fhir/Patient", json=patient("Race", mrn), headers=headers, timeout=60).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(create, [first, second] * 8))
    assert statuses.count(201) == 1 and statuses.count(200) == 15
    found = requests.get(
        f"{second}/fhir/Patient?identifier=urn:oid:2.16.840.1.113883.19.5|{mrn}&_summary=count",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    ).json()
    assert found["total"] == 1
