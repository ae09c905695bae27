"""A partner's client and the cursor of a next link: whatever cursor it sends (one it forged with an old snapshot,
one the program's own client was given, one from before a consent was revoked), each page is decided by the
restriction the partner carries now, so a patient it may not see never appears."""

from __future__ import annotations

import base64
from typing import Any

import orjson
from flask.testing import FlaskClient


def with_snapshot(link: str, snapshot: int) -> str:
    """A next link whose cursor keeps its place but claims another snapshot time."""
    path, _, encoded = link.partition("_cursor=")
    encoded, sep, rest = encoded.partition("&")
    data = orjson.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
    data[0] = snapshot
    forged = base64.urlsafe_b64encode(orjson.dumps(data)).decode().rstrip("=")
    return f"{path}_cursor={forged}{sep}{rest}"


def next_link(bundle: dict[str, Any]) -> str | None:
    found = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
    return None if found is None else found[found.index("/fhir/") :]


def subjects(client: FlaskClient, first: str) -> list[str]:
    """Every Observation subject a client pages through from ``first``, one entry a page."""
    seen: list[str] = []
    url: str | None = first
    while url:
        response = client.get(url)
        assert response.status_code == 200, response.get_json()
        bundle = response.get_json()
        seen += [e["resource"]["subject"]["reference"] for e in bundle.get("entry", [])]
        url = next_link(bundle)
    return seen


def test_a_forged_cursor_with_an_old_snapshot_shows_a_partner_no_hidden_patient(
    client: FlaskClient, program: dict[str, Any]
) -> None:
    # the program's client pages from the first entry, so the cursor's place is before B's Observation too
    link = next_link(client.get("/fhir/Observation?_count=1").get_json())
    assert link is not None
    for snapshot in (0, 1_000_000, 2**62):
        response = program["partner"].get(with_snapshot(link, snapshot))
        assert response.status_code == 200, response.get_json()
        found = {e["resource"]["subject"]["reference"] for e in response.get_json().get("entry", [])}
        assert program["b"]["patient"] not in found


def test_the_program_clients_cursor_used_by_a_partner_pages_only_what_the_partner_may_see(
    client: FlaskClient, program: dict[str, Any]
) -> None:
    first = client.get("/fhir/Observation?_count=1").get_json()
    link = next_link(first)
    assert link is not None  # the program sees both patients' Observations: there is a next page
    seen = subjects(program["partner"], link)
    assert program["b"]["patient"] not in seen
    assert set(subjects(client, "/fhir/Observation?_count=1")) == {program["a"]["patient"], program["b"]["patient"]}


def test_after_a_consent_is_revoked_the_next_page_of_a_partner_shows_nothing_of_that_patient(
    client: FlaskClient, program: dict[str, Any]
) -> None:
    partner = program["partner"]
    first = partner.get("/fhir/Observation?_count=1").get_json()
    assert [e["resource"]["subject"]["reference"] for e in first["entry"]] == [program["a"]["patient"]]
    link = next_link(first)
    assert link is not None
    revoked = client.post(f"/iop/consents/{program['consent']}/revoke", json={"revoked_on": "2026-02-01"})
    assert revoked.status_code == 200, revoked.get_json()
    after = partner.get(link)
    assert after.status_code == 200
    assert after.get_json().get("entry", []) == []


def _history_cursor(snapshot: int, served: int, last_updated: int) -> str:
    data = [snapshot, served, last_updated, 2**31 - 1, "Observation", "zzz"]
    return base64.urlsafe_b64encode(orjson.dumps(data)).decode().rstrip("=")


def test_a_forged_history_cursor_shows_a_partner_no_version_of_a_hidden_patient(
    client: FlaskClient, program: dict[str, Any]
) -> None:
    hidden = program["b"]["patient"]
    everything = client.get("/fhir/Observation/_history?_count=100").get_json()
    assert hidden in {e["resource"]["subject"]["reference"] for e in everything["entry"]}  # there is one to hide
    for snapshot, served, last_updated in ((2**62, 0, 2**62), (2**62, 10**6, 2**62), (0, 0, 2**62), (2**62, 0, 0)):
        cursor = _history_cursor(snapshot, served, last_updated)
        for path in ("/fhir/Observation/_history", "/fhir/_history"):
            response = program["partner"].get(f"{path}?_count=50&_cursor={cursor}")
            assert response.status_code == 200, response.get_json()
            bundle = response.get_json()
            found = {
                e["resource"].get("subject", {}).get("reference") for e in bundle.get("entry", []) if "resource" in e
            }
            assert hidden not in found
            assert not any(e["fullUrl"].endswith(hidden) for e in bundle.get("entry", []))


def test_a_partner_paging_history_by_next_links_sees_only_its_patients_versions(
    client: FlaskClient, program: dict[str, Any]
) -> None:
    seen: list[str] = []
    url: str | None = "/fhir/Observation/_history?_count=1"
    while url:
        response = program["partner"].get(url)
        assert response.status_code == 200, response.get_json()
        bundle = response.get_json()
        seen += [e["resource"]["subject"]["reference"] for e in bundle.get("entry", [])]
        url = next_link(bundle)
    assert seen and set(seen) == {program["a"]["patient"]}
