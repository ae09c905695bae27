"""Batch and transaction Bundles at POST /fhir (https://hl7.org/fhir/R4/http.html#transaction), on both
databases, with real records (Synthea, US Core) linked by urn:uuid."""

from __future__ import annotations

import base64
import copy
import json
import uuid
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask.testing import FlaskClient

from tests.conftest import EXAMPLES

SYNTHEA = EXAMPLES / "synthea-10-patients"
US_CORE = EXAMPLES / "us-core"
SYNTHEA_PATIENT = "63ee2253-bdd5-da55-2ad2-b4984d0ad700"  # 15 Encounters, 3 Conditions
FHIR_JSON = "application/fhir+json"
XHTML = '<div xmlns="http://www.w3.org/1999/xhtml">'


# -- helpers -------------------------------------------------------------------------------------------------


def post(client: FlaskClient, bundle: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = client.post("/fhir", data=orjson.dumps(bundle), content_type=FHIR_JSON)
    return response.status_code, orjson.loads(response.data)


def transaction(*entries: dict[str, Any], kind: str = "transaction") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def entry(
    method: str, url: str, resource: dict[str, Any] | None = None, full_url: str | None = None, **request: str
) -> dict[str, Any]:
    e: dict[str, Any] = {"request": {"method": method, "url": url, **request}}
    if full_url is not None:
        e["fullUrl"] = full_url
    if resource is not None:
        e["resource"] = resource
    return e


def urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def read(client: FlaskClient, ref: str) -> dict[str, Any]:
    response = client.get(f"/fhir/{ref}")
    assert response.status_code == 200, response.data
    result: dict[str, Any] = orjson.loads(response.data)
    return result


def search(client: FlaskClient, query: str) -> dict[str, Any]:
    response = client.get(f"/fhir/{query}")
    assert response.status_code == 200, response.data
    result: dict[str, Any] = orjson.loads(response.data)
    return result


def count(client: FlaskClient, res_type: str, query: str = "") -> int:
    total: int = search(client, f"{res_type}?{query}&_summary=count")["total"]
    return total


def ref_of(response_entry: dict[str, Any]) -> str:
    """``Type/id`` from a response entry's location ``Type/id/_history/n``."""
    location: str = response_entry["response"]["location"]
    return location.split("/_history/")[0]


def issue(outcome: dict[str, Any]) -> tuple[str, list[str]]:
    assert len(outcome["issue"]) >= 1, outcome
    first = outcome["issue"][0]
    return first["code"], first.get("expression", [])


def create(client: FlaskClient, resource: dict[str, Any]) -> dict[str, Any]:
    url = f"/fhir/{resource['resourceType']}"
    response = client.post(url, data=orjson.dumps(resource), content_type=FHIR_JSON)
    assert response.status_code == 201, response.data
    result: dict[str, Any] = orjson.loads(response.data)
    return result


def patient(identifier: str = "A-1", family: str = "Doe") -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:example:mrn", "value": identifier}],
        "name": [{"family": family, "given": ["Jo"]}],
        "gender": "female",
    }


def observation(subject: str, code: str = "8867-4") -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": subject},
        "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
    }


@cache
def _ndjson(res_type: str) -> tuple[dict[str, Any], ...]:
    lines = (SYNTHEA / f"{res_type}.000.ndjson").read_text().splitlines()
    return tuple(json.loads(line) for line in lines if line.strip())


def ndjson(res_type: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_ndjson(res_type)))


def _relink(node: Any, links: dict[str, str]) -> Any:
    """References to the exported ids turned into the urn:uuid fullUrls of the Bundle."""
    if isinstance(node, dict):
        return {k: (links.get(v, v) if k == "reference" else _relink(v, links)) for k, v in node.items()}
    if isinstance(node, list):
        return [_relink(v, links) for v in node]
    return node


def synthea_bundle(patient_id: str = SYNTHEA_PATIENT) -> dict[str, Any]:
    """One Synthea patient's record as a client would send it: the Practitioners, Locations and Organizations
    its Encounters name by conditional reference, as conditional creates, then the Patient, its Encounters and
    Conditions linked by urn:uuid."""
    subject = f"Patient/{patient_id}"
    encounters = [e for e in ndjson("Encounter") if e["subject"]["reference"] == subject]
    conditions = [c for c in ndjson("Condition") if c["subject"]["reference"] == subject]
    conditional = {
        r["reference"]
        for e in encounters
        for r in [
            *(p["individual"] for p in e.get("participant", [])),
            *(loc["location"] for loc in e.get("location", [])),
            e.get("serviceProvider", {}),
        ]
        if "?" in r.get("reference", "")
    }
    entries = []
    for res_type in ("Organization", "Location", "Practitioner"):
        for res in ndjson(res_type):
            ident = res["identifier"][0]
            condition = f"identifier={ident['system']}|{ident['value']}"
            if f"{res_type}?{condition}" in conditional:
                entries.append(entry("POST", res_type, res, urn(), ifNoneExist=condition))
    (pat,) = [p for p in ndjson("Patient") if p["id"] == patient_id]
    links = {f"Patient/{patient_id}": f"urn:uuid:{patient_id}"}
    links.update({f"Encounter/{e['id']}": f"urn:uuid:{e['id']}" for e in encounters})
    for res in [pat, *encounters, *conditions]:
        entries.append(entry("POST", res["resourceType"], _relink(res, links), f"urn:uuid:{res['id']}"))
    return transaction(*entries)


@cache
def us_core_observations() -> tuple[dict[str, Any], ...]:
    """Real Observations (US Core examples) without the references to other examples."""
    found = []
    for path in sorted(Path(US_CORE).glob("Observation-*.json")):
        res = json.loads(path.read_text())
        for key in ("id", "text", "hasMember", "derivedFrom", "encounter", "performer", "specimen", "focus"):
            res.pop(key, None)
        if res.get("status") == "final" and "valueQuantity" in res:
            found.append(res)
    assert len(found) >= 5
    return tuple(found)


# -- linking -------------------------------------------------------------------------------------------------


def test_synthea_record_is_stored_with_every_urn_uuid_reference_rewritten_to_the_new_id(
    client: FlaskClient,
) -> None:
    bundle = synthea_bundle()
    status, body = post(client, bundle)
    assert status == 200, body
    assert body["type"] == "transaction-response"
    assert len(body["entry"]) == len(bundle["entry"])
    new_ref = {e["fullUrl"]: ref_of(r) for e, r in zip(bundle["entry"], body["entry"], strict=True)}
    assert [r["response"]["status"] for r in body["entry"]] == ["201 Created"] * len(bundle["entry"])
    patient_ref = new_ref[f"urn:uuid:{SYNTHEA_PATIENT}"]
    assert patient_ref != f"Patient/{SYNTHEA_PATIENT}"
    conditions = [
        (e, r) for e, r in zip(bundle["entry"], body["entry"], strict=True) if e["request"]["url"] == "Condition"
    ]
    assert len(conditions) == 3
    for request_entry, response_entry in conditions:
        stored = read(client, ref_of(response_entry))
        assert stored["subject"]["reference"] == patient_ref
        encounter_urn = request_entry["resource"]["encounter"]["reference"]
        assert stored["encounter"]["reference"] == new_ref[encounter_urn]
        assert response_entry["resource"] == stored
    assert count(client, "Encounter", f"subject={patient_ref}") == 15
    assert count(client, "Condition", f"subject={patient_ref}") == 3


def test_conditional_references_resolve_to_the_conditional_creates_of_the_same_bundle_and_later_to_the_match(
    client: FlaskClient,
) -> None:
    bundle = synthea_bundle()
    first_status, first = post(client, bundle)
    assert first_status == 200, first
    # The same record again: the conditional creates now find the resources of the first Bundle.
    status, second = post(client, bundle)
    assert status == 200, second
    for request_entry, a, b in zip(bundle["entry"], first["entry"], second["entry"], strict=True):
        if "ifNoneExist" in request_entry["request"]:
            assert b["response"]["status"] == "200 OK"
            assert ref_of(b) == ref_of(a)
    practitioners = {
        f"Practitioner?identifier={p['identifier'][0]['system']}|{p['identifier'][0]['value']}": ref_of(r)
        for p, r in zip([e["resource"] for e in bundle["entry"]], first["entry"], strict=True)
        if p["resourceType"] == "Practitioner"
    }
    assert practitioners
    for body in (first, second):
        for request_entry, response_entry in zip(bundle["entry"], body["entry"], strict=True):
            if request_entry["request"]["url"] != "Encounter":
                continue
            wanted = practitioners[request_entry["resource"]["participant"][0]["individual"]["reference"]]
            stored = read(client, ref_of(response_entry))
            assert stored["participant"][0]["individual"]["reference"] == wanted
            assert stored["serviceProvider"]["reference"].startswith("Organization/")
    assert count(client, "Practitioner") == len(practitioners)


def test_conditional_reference_to_an_existing_resource_is_replaced_by_its_id(client: FlaskClient) -> None:
    existing = create(client, patient("MRN-7"))
    status, body = post(
        client,
        transaction(
            entry("POST", "Observation", observation("Patient?identifier=urn:example:mrn|MRN-7")),
        ),
    )
    assert status == 200, body
    assert body["entry"][0]["resource"]["subject"]["reference"] == f"Patient/{existing['id']}"


@pytest.mark.parametrize(
    ("identifier", "code"),
    [("NOBODY", "not-found"), ("TWIN", "multiple-matches")],
)
def test_conditional_reference_without_exactly_one_match_fails_with_412_at_its_path(
    client: FlaskClient, identifier: str, code: str
) -> None:
    create(client, patient("TWIN"))
    create(client, patient("TWIN"))
    status, body = post(
        client,
        transaction(
            entry("POST", "Patient", patient("NEW"), urn()),
            entry("POST", "Observation", observation(f"Patient?identifier=urn:example:mrn|{identifier}")),
        ),
    )
    assert status == 412
    assert issue(body) == (code, ["Bundle.entry[1].resource.subject.reference"])
    assert count(client, "Patient", "identifier=NEW") == 0


def test_put_with_a_urn_full_url_links_references_to_its_url_id(client: FlaskClient) -> None:
    pid = urn()
    status, body = post(
        client,
        transaction(
            entry("POST", "Observation", observation(pid)),
            entry("PUT", "Patient/chosen-id", {**patient(), "id": "chosen-id"}, pid),
        ),
    )
    assert status == 200, body
    assert [r["response"]["status"] for r in body["entry"]] == ["201 Created", "201 Created"]
    assert read(client, ref_of(body["entry"][0]))["subject"]["reference"] == "Patient/chosen-id"


def test_attachment_url_equal_to_a_full_url_is_rewritten_but_other_strings_are_not(
    client: FlaskClient,
) -> None:
    binary_url = urn()
    document = {
        "resourceType": "DocumentReference",
        "text": {"status": "generated", "div": f'{XHTML}<a href="{binary_url}">the note</a></div>'},
        "status": "current",
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": binary_url}],
        "content": [{"attachment": {"contentType": "text/plain", "url": binary_url}}],
    }
    binary = {"resourceType": "Binary", "contentType": "text/plain", "data": base64.b64encode(b"hi").decode()}
    status, body = post(
        client,
        transaction(
            entry("POST", "Binary", binary, binary_url),
            entry("POST", "DocumentReference", document),
        ),
    )
    assert status == 200, body
    stored = read(client, ref_of(body["entry"][1]))
    binary_ref = ref_of(body["entry"][0])
    assert stored["content"][0]["attachment"]["url"] == binary_ref
    assert stored["text"]["div"] == f'{XHTML}<a href="{binary_ref}">the note</a></div>'
    assert stored["identifier"][0]["value"] == binary_url


def test_relative_reference_to_a_created_entry_with_an_absolute_full_url_follows_its_new_id(
    client: FlaskClient,
) -> None:
    base = "http://clinic.example/fhir"
    status, body = post(
        client,
        transaction(
            entry("POST", "Patient", patient(), f"{base}/Patient/p1"),
            entry("POST", "Observation", observation("Patient/p1"), f"{base}/Observation/o1"),
            entry("POST", "Observation", observation(f"{base}/Patient/p1"), urn()),
        ),
    )
    assert status == 200, body
    patient_ref = ref_of(body["entry"][0])
    assert patient_ref != "Patient/p1"
    assert [e["resource"]["subject"]["reference"] for e in body["entry"][1:]] == [patient_ref, patient_ref]


def test_reference_to_a_urn_that_is_no_entry_fails_at_its_path(client: FlaskClient) -> None:
    status, body = post(
        client,
        transaction(
            entry("POST", "Patient", patient(), urn()),
            entry("POST", "Observation", observation(urn())),
        ),
    )
    assert status == 400
    assert issue(body) == ("not-found", ["Bundle.entry[1].resource.subject.reference"])
    assert count(client, "Patient") == 0


# -- atomicity -----------------------------------------------------------------------------------------------


def test_invalid_resource_in_the_middle_fails_the_transaction_at_its_path_and_nothing_is_stored(
    client: FlaskClient,
) -> None:
    pid = urn()
    bad = {**observation(pid), "status": "done"}
    status, body = post(
        client,
        transaction(
            entry("POST", "Patient", patient(), pid),
            entry("POST", "Observation", bad),
            entry("POST", "Observation", observation(pid)),
        ),
    )
    assert status == 400
    assert issue(body) == ("code-invalid", ["Bundle.entry[1].resource.status"])
    assert count(client, "Patient") == 0
    assert count(client, "Observation") == 0


def test_failure_after_writes_inside_the_transaction_rolls_every_write_back(client: FlaskClient) -> None:
    # The server starts with its conformance resources (profiles, terminology): nothing may be added to them.
    versions_before = orjson.loads(client.get("/fhir/_history").data)["total"]
    pid = urn()
    status, body = post(
        client,
        transaction(
            entry("POST", "Patient", patient(), pid),
            entry("POST", "Observation", observation(pid)),
            entry("PUT", "Patient/kept-out", {**patient("B-2"), "id": "kept-out"}),
            entry("PATCH", "Patient/missing", _json_patch([{"op": "remove", "path": "/gender"}])),
        ),
    )
    assert status == 404
    assert issue(body) == ("not-found", ["Bundle.entry[3]"])
    assert client.get("/fhir/Patient/kept-out").status_code == 404
    assert count(client, "Patient") == 0
    assert count(client, "Observation") == 0
    assert orjson.loads(client.get("/fhir/_history").data)["total"] == versions_before


def test_if_match_failure_answers_412_and_rolls_back(client: FlaskClient) -> None:
    existing = create(client, patient())
    status, body = post(
        client,
        transaction(
            entry("POST", "Observation", observation(f"Patient/{existing['id']}")),
            entry("PUT", f"Patient/{existing['id']}", {**existing, "gender": "male"}, ifMatch='W/"2"'),
        ),
    )
    assert status == 412
    assert issue(body) == ("conflict", ["Bundle.entry[1].request.ifMatch"])
    assert count(client, "Observation") == 0
    assert read(client, f"Patient/{existing['id']}")["meta"]["versionId"] == "1"


def test_if_match_on_the_current_version_updates(client: FlaskClient) -> None:
    existing = create(client, patient())
    status, body = post(
        client,
        transaction(
            entry("PUT", f"Patient/{existing['id']}", {**existing, "gender": "male"}, ifMatch='W/"1"'),
            entry("DELETE", "Patient?identifier=nobody", ifMatch='W/"1"'),
            kind="batch",
        ),
    )
    assert status == 200
    assert body["entry"][0]["response"]["status"] == "200 OK"
    assert body["entry"][0]["response"]["etag"] == 'W/"2"'
    assert body["entry"][1]["response"]["status"] == "412 Precondition Failed"
    assert read(client, f"Patient/{existing['id']}")["gender"] == "male"


@pytest.mark.parametrize("first", ["DELETE", "PUT"])
def test_two_entries_acting_on_one_resource_found_by_condition_are_refused(client: FlaskClient, first: str) -> None:
    existing = create(client, patient("SAME"))
    ops = _json_patch([{"op": "replace", "path": "/gender", "value": "male"}])
    status, body = post(
        client,
        transaction(
            entry(first, "Patient?identifier=urn:example:mrn|SAME", patient("SAME") if first == "PUT" else None),
            entry("PATCH", f"Patient/{existing['id']}", ops),
        ),
    )
    assert status == 400
    assert issue(body) == ("invalid", ["Bundle.entry[1].request.url"])
    stored = read(client, f"Patient/{existing['id']}")
    assert (stored["meta"]["versionId"], stored["gender"]) == ("1", "female")


def test_two_entries_naming_one_resource_are_refused_before_any_write(client: FlaskClient) -> None:
    status, body = post(
        client,
        transaction(
            entry("PUT", "Patient/twice", {**patient(), "id": "twice"}),
            entry("DELETE", "Patient/twice"),
        ),
    )
    assert status == 400
    assert issue(body) == ("invalid", ["Bundle.entry[1].request.url"])
    assert client.get("/fhir/Patient/twice").status_code == 404


# -- processing order and conditional interactions -----------------------------------------------------------


def test_delete_runs_before_post_so_a_conditional_create_after_a_conditional_delete_creates(
    client: FlaskClient,
) -> None:
    old = create(client, patient("X-1", "Old"))
    status, body = post(
        client,
        transaction(
            entry("POST", "Patient", patient("X-1", "New"), urn(), ifNoneExist="identifier=urn:example:mrn|X-1"),
            entry("DELETE", "Patient?identifier=urn:example:mrn|X-1"),
        ),
    )
    assert status == 200, body
    created, deleted = body["entry"]
    assert created["response"]["status"] == "201 Created"
    assert created["resource"]["name"][0]["family"] == "New"
    assert deleted["response"] == {
        "status": "204 No Content",
        "etag": 'W/"2"',
        "lastModified": deleted["response"]["lastModified"],
    }
    assert client.get(f"/fhir/Patient/{old['id']}").status_code == 410
    found = search(client, "Patient?identifier=X-1")
    assert [e["resource"]["id"] for e in found["entry"]] == [created["resource"]["id"]]


def test_conditional_create_matching_an_existing_resource_links_its_urn_to_it(client: FlaskClient) -> None:
    existing = create(client, patient("M-5"))
    pid = urn()
    status, body = post(
        client,
        transaction(
            entry("POST", "Observation", observation(pid)),
            entry("POST", "Patient", patient("M-5", "Other"), pid, ifNoneExist="identifier=urn:example:mrn|M-5"),
        ),
    )
    assert status == 200, body
    obs, pat = body["entry"]
    assert pat["response"]["status"] == "200 OK"
    assert pat["response"]["location"] == f"Patient/{existing['id']}/_history/1"
    assert pat["resource"] == existing
    assert obs["resource"]["subject"]["reference"] == f"Patient/{existing['id']}"
    assert count(client, "Patient") == 1


def test_conditional_update_in_a_transaction_updates_its_match_and_links_its_urn(client: FlaskClient) -> None:
    existing = create(client, patient("U-1"))
    pid = urn()
    status, body = post(
        client,
        transaction(
            entry("POST", "Observation", observation(pid)),
            entry("PUT", "Patient?identifier=urn:example:mrn|U-1", patient("U-1", "Updated"), pid),
        ),
    )
    assert status == 200, body
    assert body["entry"][1]["response"]["location"] == f"Patient/{existing['id']}/_history/2"
    assert body["entry"][0]["resource"]["subject"]["reference"] == f"Patient/{existing['id']}"
    assert read(client, f"Patient/{existing['id']}")["name"][0]["family"] == "Updated"


def _json_patch(operations: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Binary",
        "contentType": "application/json-patch+json",
        "data": base64.b64encode(orjson.dumps(operations)).decode(),
    }


def test_patch_entry_applies_a_json_patch_binary(client: FlaskClient) -> None:
    existing = create(client, patient())
    status, body = post(
        client,
        transaction(
            entry(
                "PATCH",
                f"Patient/{existing['id']}",
                _json_patch([{"op": "replace", "path": "/gender", "value": "male"}]),
            ),
        ),
    )
    assert status == 200, body
    assert body["entry"][0]["response"]["status"] == "200 OK"
    assert body["entry"][0]["resource"]["gender"] == "male"
    assert read(client, f"Patient/{existing['id']}")["meta"]["versionId"] == "2"


def test_fhirpath_patch_is_refused_as_not_supported(client: FlaskClient) -> None:
    parameters = {"resourceType": "Parameters", "parameter": [{"name": "operation"}]}
    status, body = post(client, transaction(entry("PATCH", "Patient/p1", parameters)))
    assert status == 400
    assert issue(body) == ("not-supported", ["Bundle.entry[0].resource"])


# -- reads ---------------------------------------------------------------------------------------------------


def test_get_entries_read_vread_and_search_and_see_the_transactions_own_writes(client: FlaskClient) -> None:
    existing = create(client, patient("G-1"))
    pid = urn()
    status, body = post(
        client,
        transaction(
            entry("GET", f"Patient/{existing['id']}"),
            entry("GET", f"Patient/{existing['id']}/_history/1"),
            entry("GET", "Patient?identifier=urn:example:mrn|G-2"),
            entry("POST", "Patient", patient("G-2"), pid),
            entry("HEAD", f"Patient/{existing['id']}"),
            entry("GET", f"Patient/{existing['id']}", ifNoneMatch='W/"1"'),
        ),
    )
    assert status == 200, body
    read_entry, vread_entry, search_entry, created, head, not_modified = body["entry"]
    assert read_entry["resource"] == existing
    assert read_entry["response"]["etag"] == 'W/"1"'
    assert vread_entry["resource"] == existing
    assert search_entry["resource"]["type"] == "searchset"
    assert [e["resource"] for e in search_entry["resource"]["entry"]] == [created["resource"]]
    assert "resource" not in head and head["response"]["status"] == "200 OK"
    assert not_modified["response"]["status"] == "304 Not Modified"


def test_batch_get_of_an_unknown_resource_answers_404_in_its_entry(client: FlaskClient) -> None:
    status, body = post(client, transaction(entry("GET", "Patient/nope"), kind="batch"))
    assert status == 200
    assert body["type"] == "batch-response"
    assert body["entry"][0]["response"]["status"] == "404 Not Found"
    assert issue(body["entry"][0]["response"]["outcome"]) == ("not-found", ["Bundle.entry[0]"])


# -- batch ---------------------------------------------------------------------------------------------------


def test_batch_stores_the_good_entries_and_answers_each_failure_in_its_entry(client: FlaskClient) -> None:
    status, body = post(
        client,
        transaction(
            entry("POST", "Patient", patient("B-1")),
            entry("POST", "Observation", {**observation("Patient/x"), "status": "done"}),
            entry("PUT", "Patient/b-two", {**patient("B-2"), "id": "b-two"}),
            entry("DELETE", "Patient"),
            entry("POST", "Patient", patient("B-3")),
            kind="batch",
        ),
    )
    assert status == 200
    statuses = [e["response"]["status"] for e in body["entry"]]
    assert statuses == ["201 Created", "400 Bad Request", "201 Created", "400 Bad Request", "201 Created"]
    outcomes = [issue(body["entry"][i]["response"]["outcome"]) for i in (1, 3)]
    assert outcomes == [
        ("code-invalid", ["Bundle.entry[1].resource.status"]),
        ("not-supported", ["Bundle.entry[3].request.url"]),
    ]
    assert count(client, "Patient") == 3
    assert count(client, "Observation") == 0


def test_batch_does_not_link_entries(client: FlaskClient) -> None:
    pid = urn()
    status, body = post(
        client,
        transaction(
            entry("POST", "Patient", patient(), pid),
            entry("POST", "Observation", observation(pid)),
            kind="batch",
        ),
    )
    assert status == 200
    assert body["entry"][1]["resource"]["subject"]["reference"] == pid


# -- the envelope --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bundle", "status", "code", "expression"),
    [
        ({"resourceType": "Bundle", "type": "collection", "entry": []}, 400, "invalid", "Bundle.type"),
        ({"resourceType": "Patient"}, 400, "invalid", "resourceType"),
        (
            transaction({"request": {"method": "POST"}, "resource": patient()}),
            400,
            "required",
            "Bundle.entry[0].request.url",
        ),
        (
            transaction(entry("GET", "Patient"), {"request": {"method": "FETCH", "url": "Patient"}}),
            400,
            "value",
            "Bundle.entry[1].request.method",
        ),
        (transaction(entry("POST", "Patient")), 400, "required", "Bundle.entry[0].resource"),
        (transaction(entry("GET", "Nonsense/1")), 404, "not-supported", "Bundle.entry[0].request.url"),
        (
            transaction(entry("POST", "Patient/1", patient())),
            400,
            "not-supported",
            "Bundle.entry[0].request.url",
        ),
        (transaction(entry("DELETE", "Patient")), 400, "not-supported", "Bundle.entry[0].request.url"),
        (
            transaction(entry("GET", "http://elsewhere.example/fhir/Patient/1")),
            400,
            "not-supported",
            "Bundle.entry[0].request.url",
        ),
        (
            transaction(
                entry("POST", "Patient", patient(), "urn:uuid:1"),
                entry("POST", "Patient", patient(), "urn:uuid:1"),
            ),
            400,
            "duplicate",
            "Bundle.entry[1].fullUrl",
        ),
        (
            transaction(entry("PUT", "Patient/p", {**patient(), "id": "q"})),
            400,
            "invalid",
            "Bundle.entry[0].resource.id",
        ),
        (
            transaction(entry("PUT", "Patient/p", {**patient(), "id": "p"}, ifMatch="yesterday")),
            400,
            "invalid",
            "Bundle.entry[0].request.ifMatch",
        ),
    ],
)
def test_malformed_bundle_is_refused_naming_the_entry(
    sqlite_client: FlaskClient, bundle: dict[str, Any], status: int, code: str, expression: str
) -> None:
    answered, body = post(sqlite_client, bundle)
    assert answered == status
    assert issue(body) == (code, [expression])


def test_more_entries_than_the_limit_answers_413(sqlite_client: FlaskClient) -> None:
    bundle = transaction(*[entry("GET", "Patient/x")] * 5001)
    status, body = post(sqlite_client, bundle)
    assert status == 413
    assert issue(body) == ("too-costly", ["Bundle.entry"])


def test_process_honours_a_lower_entry_limit(sqlite_app: Any) -> None:
    from iop_fhir.errors import PayloadTooLarge
    from iop_fhir.fhir import transaction as tx_module

    repo = sqlite_app.extensions["iop_fhir.repository"]
    with pytest.raises(PayloadTooLarge):
        tx_module.process(repo, transaction(*[entry("GET", "Patient/x")] * 3), base_url="http://t/fhir", max_entries=2)


# -- size ----------------------------------------------------------------------------------------------------


def test_transaction_of_a_patient_and_1000_observations_linked_by_urn(client: FlaskClient) -> None:
    pid = urn()
    examples = us_core_observations()
    entries = [entry("POST", "Patient", patient("BIG"), pid)]
    for i in range(1000):
        obs = dict(examples[i % len(examples)])
        obs["subject"] = {"reference": pid}
        entries.append(entry("POST", "Observation", obs, urn()))
    status, body = post(client, transaction(*entries))
    assert status == 200
    assert len(body["entry"]) == 1001
    assert {e["response"]["status"] for e in body["entry"]} == {"201 Created"}
    patient_ref = ref_of(body["entry"][0])
    assert {e["resource"]["subject"]["reference"] for e in body["entry"][1:]} == {patient_ref}
    assert count(client, "Observation", f"subject={patient_ref}") == 1000
    assert read(client, ref_of(body["entry"][500])) == body["entry"][500]["resource"]
