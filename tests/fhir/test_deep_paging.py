"""Paging through a search by its next links while the data changes (https://hl7.org/fhir/R4/http.html#paging):
every resource that matched when the first page was read comes exactly once, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json
from collections import Counter
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
import pytest
from flask.testing import FlaskClient

FHIR = "application/fhir+json"
LOINC = "http://loinc.org"
PAGE = 4


def observation(code: str, day: int, value: float = 1.0) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "effectiveDateTime": f"2026-03-{day:02d}",
        "valueQuantity": {"value": value, "unit": "{score}"},
    }


def create(client: FlaskClient, resource: dict[str, Any]) -> str:
    response = client.post("/fhir/Observation", data=orjson.dumps(resource), headers={"Content-Type": FHIR})
    assert response.status_code == 201, response.get_json()
    res_id: str = response.get_json()["id"]
    return res_id


def update(client: FlaskClient, res_id: str, resource: dict[str, Any]) -> None:
    response = client.put(
        f"/fhir/Observation/{res_id}", data=orjson.dumps({**resource, "id": res_id}), headers={"Content-Type": FHIR}
    )
    assert response.status_code == 200, response.get_json()


def next_url(bundle: dict[str, Any]) -> str | None:
    following = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
    if following is None:
        return None
    url = urlsplit(following)
    return f"{url.path}?{url.query}"


@pytest.mark.parametrize(
    "sort",
    [
        "",  # the default order: last_updated, which every update changes
        "&_sort=date",
        "&_sort=-date",
        "&_sort=code,-value-quantity",
        "&_sort=-_lastUpdated",
    ],
)
def test_paging_under_writes_serves_every_resource_that_matched_at_the_start_exactly_once(
    client: FlaskClient, sort: str
) -> None:
    # 20 matching Observations over 10 days and two codes, and one that does not match (a GAD-7).
    days = {create(client, observation(f"44261-{n % 2}", 10 + n // 2, float(n))): 10 + n // 2 for n in range(20)}
    create(client, observation("70274-6", 15))
    search = f"/fhir/Observation?code=44261-0,44261-1&_count={PAGE}{sort}"

    bundle = client.get(search).get_json()
    assert bundle["total"] == 20
    seen = [e["resource"]["id"] for e in bundle["entry"]]
    pages = 1
    while (url := next_url(bundle)) is not None:
        assert "_cursor" in dict(parse_qsl(urlsplit(url).query)) and "_offset" not in url
        # Between pages: each entry already served and each not yet served moves to the other end of every order
        # (new date, code, value and last_updated), and a new matching resource comes in at each end.
        served = seen[-1]
        waiting = next(i for i in days if i not in seen)
        update(client, served, observation("44261-1", 28, 99.0))
        update(client, waiting, observation("44261-0", 1, -1.0))
        create(client, observation("44261-0", 1, -5.0))
        create(client, observation("44261-1", 30, 500.0))
        bundle = client.get(url).get_json()
        assert bundle["resourceType"] == "Bundle", bundle
        assert "previous" not in [link["relation"] for link in bundle["link"]]
        seen += [e["resource"]["id"] for e in bundle["entry"]]
        pages += 1

    counts = Counter(seen)
    assert {i: counts[i] for i in days} == dict.fromkeys(days, 1)
    assert set(seen) == set(days)  # those created after the first page belong to a new search
    assert pages == 5


def test_entries_come_in_the_order_they_had_when_paging_began(client: FlaskClient) -> None:
    ids = [create(client, observation("44261-0", day)) for day in (5, 3, 9, 1, 7)]
    bundle = client.get("/fhir/Observation?_sort=date&_count=2").get_json()
    seen = [e["resource"]["id"] for e in bundle["entry"]]
    assert seen == [ids[3], ids[1]]
    update(client, ids[2], observation("44261-0", 2))  # day 9 becomes day 2: before the cursor now
    url = next_url(bundle)
    while url is not None:
        bundle = client.get(url).get_json()
        seen += [e["resource"]["id"] for e in bundle["entry"]]
        url = next_url(bundle)
    assert seen == [ids[3], ids[1], ids[0], ids[4], ids[2]]
    # served as it is now
    assert bundle["entry"][-1]["resource"]["effectiveDateTime"] == "2026-03-02"


def test_a_page_cursor_that_is_not_one_of_this_server_is_refused(client: FlaskClient) -> None:
    response = client.get("/fhir/Observation?_cursor=bm90LWEtY3Vyc29y")
    assert response.status_code == 400
    issue = response.get_json()["issue"][0]
    assert (issue["code"], issue["expression"]) == ("invalid", ["_cursor"])


def test_offset_pages_still_serve_and_link_by_offset(client: FlaskClient) -> None:
    ids = [create(client, observation("44261-0", day)) for day in (5, 3, 9)]
    bundle = client.get("/fhir/Observation?_sort=date&_count=1&_offset=1").get_json()
    assert [e["resource"]["id"] for e in bundle["entry"]] == [ids[0]]
    relations = {link["relation"]: dict(parse_qsl(urlsplit(link["url"]).query)) for link in bundle["link"]}
    assert relations["previous"].get("_offset") is None  # back to offset 0
    assert "_cursor" in relations["next"]
    following = client.get(next_url(bundle) or "").get_json()
    assert [e["resource"]["id"] for e in following["entry"]] == [ids[2]]


# -- history: newest first, continued by a cursor after the last entry served


def encoded(data: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def history_ids(client: FlaskClient, first: str) -> tuple[list[tuple[str, str]], list[int], list[str]]:
    """Every (id, version) a client pages through from ``first``, the total of each page, and each next link."""
    seen: list[tuple[str, str]] = []
    totals: list[int] = []
    links: list[str] = []
    url: str | None = first
    while url is not None:
        response = client.get(url)
        assert response.status_code == 200, response.get_json()
        bundle = response.get_json()
        seen += [(e["resource"]["id"], e["resource"]["meta"]["versionId"]) for e in bundle.get("entry", [])]
        totals.append(bundle["total"])
        url = next_url(bundle)
        if url is not None:
            links.append(url)
    return seen, totals, links


def test_history_paged_by_next_links_under_writes_serves_every_version_of_the_start_exactly_once(
    client: FlaskClient,
) -> None:
    ids = [create(client, observation("44261-0", day)) for day in range(1, 8)]
    for res_id in ids[:4]:
        update(client, res_id, observation("44261-0", 20))
    expected = [
        (e["resource"]["id"], e["resource"]["meta"]["versionId"])
        for e in client.get("/fhir/Observation/_history?_count=100").get_json()["entry"]
    ]
    assert len(expected) == 11
    first = client.get(f"/fhir/Observation/_history?_count={PAGE}").get_json()
    seen = [(e["resource"]["id"], e["resource"]["meta"]["versionId"]) for e in first["entry"]]
    totals = [first["total"]]
    url = next_url(first)
    while url is not None:  # between pages: new versions and new resources, newer than every entry of the paging
        assert "_cursor=" in url and "_offset=" not in url
        update(client, ids[len(seen) % len(ids)], observation("44261-0", 21))
        create(client, observation("44261-0", 22))
        bundle = client.get(url).get_json()
        seen += [(e["resource"]["id"], e["resource"]["meta"]["versionId"]) for e in bundle["entry"]]
        totals.append(bundle["total"])
        url = next_url(bundle)
    assert seen == expected
    assert set(totals) == {11}


def test_a_deep_history_page_reached_by_offset_continues_by_cursor_and_links_back_by_offset(
    client: FlaskClient,
) -> None:
    for day in range(1, 10):
        create(client, observation("44261-0", day))
    everything, _, _ = history_ids(client, "/fhir/_history?_count=100")
    bundle = client.get("/fhir/_history?_count=3&_offset=3").get_json()
    relations = {link["relation"]: dict(parse_qsl(urlsplit(link["url"]).query)) for link in bundle["link"]}
    assert relations["previous"]["_offset"] == "0"
    assert "_cursor" in relations["next"] and "_offset" not in relations["next"]
    rest, totals, links = history_ids(client, next_url(bundle) or "")
    assert [(e["resource"]["id"], e["resource"]["meta"]["versionId"]) for e in bundle["entry"]] + rest == everything[3:]
    assert all("previous" not in link for link in links)
    assert set(totals) == {len(everything)}


@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("_cursor=bm90LWEtY3Vyc29y", "not a history page cursor"),
        ("_cursor=WzEsMiwzXQ", "not a history page cursor"),  # [1,2,3]
        ("_cursor=WzEsLTEsMSwxLCJPYnNlcnZhdGlvbiIsIngiXQ", "not a history page cursor"),  # a negative count served
        ("_offset=2&_cursor=WzEsMiwzLDQsIk9ic2VydmF0aW9uIiwieCJd", "cannot be used together"),
        (f"_cursor={encoded([1, 2, 3, 2**31, 'Observation', 'x'])}", "not a history page cursor"),  # version_id
        ("_cursor=" + encoded([1, 2, 3, 4, "Observation", "x" + chr(0)]), "not a history page cursor"),
        (f"_cursor={encoded([2**64, 2, 3, 4, 'Observation', 'x'])}", "not a history page cursor"),
    ],
)
def test_a_history_cursor_that_is_not_one_of_this_server_is_refused_naming_it(
    client: FlaskClient, query: str, why: str
) -> None:
    response = client.get(f"/fhir/Observation/_history?{query}")
    assert response.status_code == 400
    issue = response.get_json()["issue"][0]
    assert (issue["code"], issue["expression"]) == ("invalid", ["_cursor"])
    assert why in issue["diagnostics"]
