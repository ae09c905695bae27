"""The REST interactions of https://hl7.org/fhir/R4/http.html, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import orjson
import pytest
from flask.testing import FlaskClient

FHIR = "application/fhir+json"


def patient(family: str = "Rivera", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5", "value": f"MRN-{family}"}],
        "name": [{"family": family, "given": ["Alex"]}],
        "gender": "other",
        "birthDate": "1990-04-01",
        **extra,
    }


def post(client: FlaskClient, resource: dict[str, Any], **headers: str) -> Any:
    return client.post(
        f"/fhir/{resource['resourceType']}",
        data=orjson.dumps(resource),
        headers={"Content-Type": FHIR, **headers},
    )


def put(client: FlaskClient, path: str, resource: dict[str, Any], **headers: str) -> Any:
    return client.put(f"/fhir/{path}", data=orjson.dumps(resource), headers={"Content-Type": FHIR, **headers})


def issue(response: Any) -> dict[str, Any]:
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome", body
    first: dict[str, Any] = body["issue"][0]
    return first


def test_create_returns_201_with_location_etag_and_server_meta(client: FlaskClient) -> None:
    response = post(client, patient())
    assert response.status_code == 201
    body = response.get_json()
    assert response.headers["Location"] == f"http://testserver/fhir/Patient/{body['id']}/_history/1"
    assert response.headers["ETag"] == 'W/"1"'
    assert response.headers["Last-Modified"].endswith("GMT")
    assert response.mimetype == FHIR
    assert body["meta"]["versionId"] == "1"
    assert body["meta"]["lastUpdated"].endswith("Z")


def test_create_ignores_a_client_id(client: FlaskClient) -> None:
    response = post(client, patient(id="chosen-by-client"))
    assert response.status_code == 201
    assert response.get_json()["id"] != "chosen-by-client"


def test_a_created_resource_gets_a_version_7_uuid_of_the_moment_it_was_created(client: FlaskClient) -> None:
    made = [post(client, patient()).get_json() for _ in range(3)]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": patient(), "request": {"method": "POST", "url": "Patient"}}],
    }
    answer = client.post("/fhir", data=orjson.dumps(bundle), headers={"Content-Type": FHIR})
    made.append(answer.get_json()["entry"][0]["response"])
    for found in made:
        res_id = found["id"] if "id" in found else found["location"].split("/")[1]
        assert uuid.UUID(res_id).version == 7 and str(uuid.UUID(res_id)) == res_id
        stored = client.get(f"/fhir/Patient/{res_id}").get_json()
        updated = datetime.fromisoformat(stored["meta"]["lastUpdated"].replace("Z", "+00:00"))
        made_at = uuid.UUID(res_id).int >> 80  # the millisecond the id was made, just before the resource was stored
        assert 0 <= int(updated.timestamp() * 1000) - made_at < 60_000
    ids = [f["id"] for f in made[:3]]
    assert ids == sorted(ids) or len({i[:13] for i in ids}) < 3  # in order unless made in the same millisecond


def test_read_returns_exactly_the_stored_resource(client: FlaskClient) -> None:
    created = post(client, patient()).get_json()
    response = client.get(f"/fhir/Patient/{created['id']}")
    assert response.status_code == 200
    assert response.get_json() == created
    assert response.headers["ETag"] == 'W/"1"'


def test_read_of_unknown_id_returns_404_not_found(client: FlaskClient) -> None:
    response = client.get("/fhir/Patient/does-not-exist")
    assert response.status_code == 404
    assert issue(response)["code"] == "not-found"


def test_unknown_resource_type_returns_404(client: FlaskClient) -> None:
    response = client.get("/fhir/Patientx/1")
    assert response.status_code == 404
    assert issue(response)["code"] == "not-supported"


def test_update_creates_new_version_and_vread_returns_each(client: FlaskClient) -> None:
    created = post(client, patient()).get_json()
    changed = {**created, "gender": "female"}
    response = put(client, f"Patient/{created['id']}", changed)
    assert response.status_code == 200
    assert response.headers["ETag"] == 'W/"2"'
    v1 = client.get(f"/fhir/Patient/{created['id']}/_history/1").get_json()
    v2 = client.get(f"/fhir/Patient/{created['id']}/_history/2").get_json()
    assert (v1["gender"], v1["meta"]["versionId"]) == ("other", "1")
    assert (v2["gender"], v2["meta"]["versionId"]) == ("female", "2")
    assert client.get(f"/fhir/Patient/{created['id']}/_history/3").status_code == 404


def test_update_with_a_client_id_creates_the_resource(client: FlaskClient) -> None:
    response = put(client, "Patient/iop-enrollment-1", patient(id="iop-enrollment-1"))
    assert response.status_code == 201
    assert response.headers["Location"] == "http://testserver/fhir/Patient/iop-enrollment-1/_history/1"
    assert client.get("/fhir/Patient/iop-enrollment-1").status_code == 200


def test_update_with_id_mismatch_is_refused_with_the_id_path(client: FlaskClient) -> None:
    response = put(client, "Patient/a", patient(id="b"))
    assert response.status_code == 400
    assert issue(response)["expression"] == ["Patient.id"]
    assert client.get("/fhir/Patient/a").status_code == 404


def test_update_with_stale_if_match_returns_412_and_changes_nothing(client: FlaskClient) -> None:
    created = post(client, patient()).get_json()
    put(client, f"Patient/{created['id']}", {**created, "gender": "male"})
    response = put(client, f"Patient/{created['id']}", {**created, "gender": "female"}, **{"If-Match": 'W/"1"'})
    assert response.status_code == 412
    assert issue(response)["expression"] == ["If-Match"]
    current = client.get(f"/fhir/Patient/{created['id']}").get_json()
    assert (current["gender"], current["meta"]["versionId"]) == ("male", "2")


def test_update_with_current_if_match_succeeds(client: FlaskClient) -> None:
    created = post(client, patient()).get_json()
    response = put(client, f"Patient/{created['id']}", {**created, "gender": "male"}, **{"If-Match": 'W/"1"'})
    assert response.status_code == 200
    assert response.headers["ETag"] == 'W/"2"'


def test_delete_then_read_returns_410_and_history_keeps_the_versions(client: FlaskClient) -> None:
    created = post(client, patient()).get_json()
    assert client.delete(f"/fhir/Patient/{created['id']}").status_code == 204
    gone = client.get(f"/fhir/Patient/{created['id']}")
    assert gone.status_code == 410
    assert issue(gone)["code"] == "deleted"
    history = client.get(f"/fhir/Patient/{created['id']}/_history").get_json()
    assert history["type"] == "history"
    assert history["total"] == 2
    assert [e["request"]["method"] for e in history["entry"]] == ["DELETE", "POST"]
    assert "resource" not in history["entry"][0]
    assert client.get(f"/fhir/Patient/{created['id']}/_history/1").get_json()["name"][0]["family"] == "Rivera"


def test_delete_of_a_deleted_resource_is_idempotent(client: FlaskClient) -> None:
    created = post(client, patient()).get_json()
    client.delete(f"/fhir/Patient/{created['id']}")
    assert client.delete(f"/fhir/Patient/{created['id']}").status_code == 204
    history = client.get(f"/fhir/Patient/{created['id']}/_history").get_json()
    assert history["total"] == 2


def test_update_after_delete_recreates_with_the_next_version(client: FlaskClient) -> None:
    created = post(client, patient()).get_json()
    client.delete(f"/fhir/Patient/{created['id']}")
    response = put(client, f"Patient/{created['id']}", patient(id=created["id"]))
    assert response.status_code == 201
    assert response.headers["ETag"] == 'W/"3"'


def test_type_and_system_history_list_every_version_newest_first(client: FlaskClient) -> None:
    # The server starts with its conformance resources (profiles, terminology) in the system history.
    seeded = client.get("/fhir/_history").get_json()["total"]
    first = post(client, patient("One")).get_json()
    post(client, patient("Two"))
    put(client, f"Patient/{first['id']}", {**first, "gender": "male"})
    history = client.get("/fhir/Patient/_history").get_json()
    assert history["total"] == 3
    assert history["entry"][0]["resource"]["meta"]["versionId"] == "2"
    system = client.get("/fhir/_history?_count=2").get_json()
    assert system["total"] == seeded + 3
    assert len(system["entry"]) == 2
    assert [e["resource"]["resourceType"] for e in system["entry"]] == ["Patient", "Patient"]
    assert [link["relation"] for link in system["link"]] == ["self", "next"]


def test_json_patch_applies_and_versions(client: FlaskClient) -> None:
    created = post(client, patient()).get_json()
    ops = [{"op": "replace", "path": "/gender", "value": "female"}]
    response = client.patch(
        f"/fhir/Patient/{created['id']}",
        data=orjson.dumps(ops),
        headers={"Content-Type": "application/json-patch+json", "If-Match": 'W/"1"'},
    )
    assert response.status_code == 200
    assert response.get_json()["gender"] == "female"
    assert response.headers["ETag"] == 'W/"2"'


def test_json_patch_that_breaks_the_resource_is_refused_and_changes_nothing(client: FlaskClient) -> None:
    created = post(client, patient()).get_json()
    ops = [{"op": "replace", "path": "/gender", "value": "bogus"}]
    response = client.patch(
        f"/fhir/Patient/{created['id']}",
        data=orjson.dumps(ops),
        headers={"Content-Type": "application/json-patch+json"},
    )
    assert response.status_code == 400
    assert issue(response)["expression"] == ["Patient.gender"]
    assert client.get(f"/fhir/Patient/{created['id']}").get_json()["gender"] == "other"


def test_json_patch_with_a_failing_test_op_returns_422(client: FlaskClient) -> None:
    created = post(client, patient()).get_json()
    ops = [{"op": "test", "path": "/gender", "value": "male"}]
    response = client.patch(
        f"/fhir/Patient/{created['id']}",
        data=orjson.dumps(ops),
        headers={"Content-Type": "application/json-patch+json"},
    )
    assert response.status_code == 422


@pytest.mark.parametrize(
    ("prefer", "has_body", "resource_type"),
    [
        ("return=minimal", False, None),
        ("return=representation", True, "Patient"),
        ("return=OperationOutcome", True, "OperationOutcome"),
    ],
)
def test_prefer_return_shapes_the_write_response(
    client: FlaskClient, prefer: str, has_body: bool, resource_type: str | None
) -> None:
    response = post(client, patient(), Prefer=prefer)
    assert response.status_code == 201
    assert "Location" in response.headers
    assert bool(response.data) is has_body
    if has_body:
        assert response.get_json()["resourceType"] == resource_type


def test_malformed_json_returns_400_structure(client: FlaskClient) -> None:
    response = client.post("/fhir/Patient", data=b'{"resourceType": "Patient",', headers={"Content-Type": FHIR})
    assert response.status_code == 400
    assert issue(response)["code"] == "structure"


def test_wrong_content_type_returns_415(client: FlaskClient) -> None:
    response = client.post("/fhir/Patient", data=orjson.dumps(patient()), headers={"Content-Type": "text/plain"})
    assert response.status_code == 415
    assert issue(response)["expression"] == ["Content-Type"]


def test_application_json_and_format_parameter_are_accepted(client: FlaskClient) -> None:
    response = client.post(
        "/fhir/Patient?_format=json",
        data=orjson.dumps(patient()),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 201


def test_xml_is_not_acceptable(client: FlaskClient) -> None:
    response = client.get("/fhir/metadata", headers={"Accept": "application/fhir+xml"})
    assert response.status_code == 406
    assert issue(response)["code"] == "not-supported"


def test_body_over_the_limit_returns_413(client: FlaskClient) -> None:
    client.application.config["MAX_CONTENT_LENGTH"] = 1000
    big = patient(
        text={
            "status": "generated",
            "div": '<div xmlns="http://www.w3.org/1999/xhtml">' + "x" * 2000 + "</div>",
        }
    )
    response = post(client, big)
    assert response.status_code == 413
    assert issue(response)["code"] == "too-costly"


def test_resource_type_mismatch_with_url_is_refused(client: FlaskClient) -> None:
    response = client.post("/fhir/Observation", data=orjson.dumps(patient()), headers={"Content-Type": FHIR})
    assert response.status_code == 400
    assert issue(response)["expression"] == ["Observation.resourceType"]


def test_required_binding_violation_is_refused_with_its_path(client: FlaskClient) -> None:
    care_plan = {
        "resourceType": "CarePlan",
        "status": "active",
        "intent": "bogus",
        "subject": {"reference": "Patient/p1"},
    }
    response = post(client, care_plan)
    assert response.status_code == 400
    assert issue(response)["expression"] == ["CarePlan.intent"]
    assert client.get("/fhir/CarePlan").get_json()["total"] == 0


def test_every_validation_issue_is_reported_at_once(client: FlaskClient) -> None:
    bad = {"resourceType": "Patient", "gender": "nope", "birthDate": "01/04/1990", "unknownThing": 1}
    response = post(client, bad)
    assert response.status_code == 400
    expressions = {e for i in response.get_json()["issue"] for e in i.get("expression", [])}
    assert {"Patient.gender", "Patient.birthDate", "Patient.unknownThing"} <= expressions


def test_validate_operation_reports_issues_without_storing(client: FlaskClient) -> None:
    bad = {
        "resourceType": "CarePlan",
        "status": "active",
        "intent": "bogus",
        "subject": {"reference": "Patient/p"},
    }
    response = client.post("/fhir/CarePlan/$validate", data=orjson.dumps(bad), headers={"Content-Type": FHIR})
    assert response.status_code == 200
    assert issue(response)["expression"] == ["CarePlan.intent"]
    ok = client.post("/fhir/Patient/$validate", data=orjson.dumps(patient()), headers={"Content-Type": FHIR})
    assert issue(ok)["severity"] == "information"


def test_conditional_create_returns_the_existing_match(client: FlaskClient) -> None:
    first = post(client, patient(), **{"If-None-Exist": "identifier=urn:oid:2.16.840.1.113883.19.5|MRN-Rivera"})
    second = post(client, patient(), **{"If-None-Exist": "identifier=urn:oid:2.16.840.1.113883.19.5|MRN-Rivera"})
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.get_json()["id"] == second.get_json()["id"]


def test_conditional_create_with_two_matches_returns_412(client: FlaskClient) -> None:
    post(client, patient())
    post(client, patient())
    response = post(client, patient(), **{"If-None-Exist": "family=Rivera"})
    assert response.status_code == 412


def test_conditional_update_creates_then_updates_by_identifier(client: FlaskClient) -> None:
    query = "Patient?identifier=urn:oid:2.16.840.1.113883.19.5|MRN-Rivera"
    first = put(client, query, patient())
    assert first.status_code == 201
    second = put(client, query, patient(gender="female") | {"gender": "female"})
    assert second.status_code == 200
    assert second.get_json()["id"] == first.get_json()["id"]
    assert second.headers["ETag"] == 'W/"2"'


def test_conditional_update_with_two_matches_returns_412(client: FlaskClient) -> None:
    post(client, patient())
    post(client, patient())
    response = put(client, "Patient?family=Rivera", patient())
    assert response.status_code == 412


def test_conditional_delete_removes_the_single_match(client: FlaskClient) -> None:
    created = post(client, patient()).get_json()
    response = client.delete("/fhir/Patient?identifier=MRN-Rivera")
    assert response.status_code == 204
    assert client.get(f"/fhir/Patient/{created['id']}").status_code == 410


def test_search_unknown_parameter_returns_400_naming_it(client: FlaskClient) -> None:
    response = client.get("/fhir/Patient?favourite-colour=blue")
    assert response.status_code == 400
    assert issue(response)["expression"] == ["favourite-colour"]


def test_search_unknown_parameter_is_ignored_when_lenient_and_left_out_of_self(client: FlaskClient) -> None:
    post(client, patient())
    response = client.get("/fhir/Patient?favourite-colour=blue&family=rivera", headers={"Prefer": "handling=lenient"})
    assert response.status_code == 200
    bundle = response.get_json()
    assert bundle["total"] == 1
    matches = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "match"]
    assert [m["name"][0]["family"] for m in matches] == ["Rivera"]
    (ignored,) = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert "favourite-colour" in ignored["issue"][0]["diagnostics"]
    self_link = next(link["url"] for link in bundle["link"] if link["relation"] == "self")
    assert "favourite-colour" not in self_link
    assert "family=rivera" in self_link


def test_metadata_states_fhir_4_0_1_and_every_type(client: FlaskClient) -> None:
    statement = client.get("/fhir/metadata").get_json()
    assert statement["fhirVersion"] == "4.0.1"
    types = {r["type"] for r in statement["rest"][0]["resource"]}
    assert {"CarePlan", "Encounter", "Observation", "Patient", "Task", "Consent"} <= types
    care_plan = next(r for r in statement["rest"][0]["resource"] if r["type"] == "CarePlan")
    assert {"subject", "patient", "status", "intent", "date"} <= {p["name"] for p in care_plan["searchParam"]}


def test_method_not_allowed_is_an_operation_outcome(client: FlaskClient) -> None:
    response = client.patch("/fhir/Patient/1/_history")
    assert response.status_code == 405
    assert issue(response)["code"] == "not-supported"


def test_conditional_update_with_if_match_and_no_match_returns_412_and_creates_nothing(client: FlaskClient) -> None:
    response = put(client, "Patient?identifier=MRN-nobody", patient(), **{"If-Match": 'W/"1"'})
    assert response.status_code == 412
    assert issue(response)["expression"] == ["If-Match"]
    assert client.get("/fhir/Patient?_summary=count").get_json()["total"] == 0


def test_history_with_count_zero_gives_the_total_and_no_next_link(client: FlaskClient) -> None:
    post(client, patient())
    history = client.get("/fhir/Patient/_history?_count=0").get_json()
    assert history["total"] == 1
    assert [link["relation"] for link in history["link"]] == ["self"]


# -- what common clients send (fhirpy, Aidbox-style servers' clients) -------------------------------------------

MRN_QUERY = "identifier=urn:oid:2.16.840.1.113883.19.5|MRN-Rivera"


def test_post_with_a_query_string_is_a_conditional_create_and_never_a_duplicate(client: FlaskClient) -> None:
    first = client.post(f"/fhir/Patient?{MRN_QUERY}", data=orjson.dumps(patient()), headers={"Content-Type": FHIR})
    second = client.post(f"/fhir/Patient?{MRN_QUERY}", data=orjson.dumps(patient()), headers={"Content-Type": FHIR})
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.get_json()["id"] == second.get_json()["id"]
    assert client.get("/fhir/Patient?_summary=count").get_json()["total"] == 1


def test_post_with_a_query_string_matching_two_returns_412_and_creates_nothing(client: FlaskClient) -> None:
    post(client, patient())
    post(client, patient())
    response = client.post("/fhir/Patient?family=Rivera", data=orjson.dumps(patient()), headers={"Content-Type": FHIR})
    assert response.status_code == 412
    assert client.get("/fhir/Patient?_summary=count").get_json()["total"] == 2


def test_post_with_an_unknown_query_parameter_returns_400_naming_it_and_creates_nothing(client: FlaskClient) -> None:
    response = client.post("/fhir/Patient?bogus=1", data=orjson.dumps(patient()), headers={"Content-Type": FHIR})
    assert response.status_code == 400
    assert issue(response)["expression"] == ["bogus"]
    assert client.get("/fhir/Patient?_summary=count").get_json()["total"] == 0


def test_post_with_a_query_and_a_different_if_none_exist_returns_400(client: FlaskClient) -> None:
    response = client.post(
        f"/fhir/Patient?{MRN_QUERY}",
        data=orjson.dumps(patient()),
        headers={"Content-Type": FHIR, "If-None-Exist": "family=Other"},
    )
    assert response.status_code == 400
    assert issue(response)["expression"] == ["If-None-Exist"]
    same = client.post(
        f"/fhir/Patient?{MRN_QUERY}",
        data=orjson.dumps(patient()),
        headers={"Content-Type": FHIR, "If-None-Exist": MRN_QUERY},
    )
    assert same.status_code == 201


def test_post_with_only_format_in_the_query_is_a_plain_create(client: FlaskClient) -> None:
    response = client.post("/fhir/Patient?_format=json", data=orjson.dumps(patient()), headers={"Content-Type": FHIR})
    assert response.status_code == 201


@pytest.mark.parametrize(("method", "total"), [("count", 2), ("accurate", 2), ("estimate", 2), ("none", None)])
def test_total_method_is_accepted_as_total(client: FlaskClient, method: str, total: int | None) -> None:
    post(client, patient())
    post(client, patient("Okafor"))
    bundle = client.get(f"/fhir/Patient?_totalMethod={method}&_count=1").get_json()
    assert bundle["resourceType"] == "Bundle", bundle
    assert bundle.get("total") == total


def test_total_method_with_an_unknown_value_returns_400_naming_it(client: FlaskClient) -> None:
    response = client.get("/fhir/Patient?_totalMethod=guess")
    assert response.status_code == 400
    assert issue(response)["expression"] == ["_totalMethod"]


@pytest.mark.parametrize("content_type", ["application/json", "application/merge-patch+json"])
def test_merge_patch_with_a_partial_resource_updates_and_versions(client: FlaskClient, content_type: str) -> None:
    created = post(client, patient()).get_json()
    response = client.patch(
        f"/fhir/Patient/{created['id']}",
        data=orjson.dumps({"gender": "female", "birthDate": None, "name": [{"family": "Okafor"}]}),
        headers={"Content-Type": content_type, "If-Match": 'W/"1"'},
    )
    assert response.status_code == 200, response.get_json()
    stored = client.get(f"/fhir/Patient/{created['id']}").get_json()
    assert stored["meta"]["versionId"] == "2"
    assert stored["gender"] == "female"
    assert "birthDate" not in stored
    assert stored["name"] == [{"family": "Okafor"}]
    assert stored["identifier"] == created["identifier"]


def test_merge_patch_with_a_stale_if_match_returns_412_and_changes_nothing(client: FlaskClient) -> None:
    created = post(client, patient()).get_json()
    response = client.patch(
        f"/fhir/Patient/{created['id']}",
        data=orjson.dumps({"gender": "female"}),
        headers={"Content-Type": "application/merge-patch+json", "If-Match": 'W/"7"'},
    )
    assert response.status_code == 412
    assert client.get(f"/fhir/Patient/{created['id']}").get_json()["gender"] == "other"


def test_merge_patch_that_breaks_the_resource_is_refused_and_changes_nothing(client: FlaskClient) -> None:
    created = post(client, patient()).get_json()
    response = client.patch(
        f"/fhir/Patient/{created['id']}",
        data=orjson.dumps({"gender": "sometimes"}),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code in (400, 422)
    assert issue(response)["expression"] == ["Patient.gender"]
    assert client.get(f"/fhir/Patient/{created['id']}").get_json()["meta"]["versionId"] == "1"


def test_merge_patch_that_is_not_an_object_returns_400(client: FlaskClient) -> None:
    created = post(client, patient()).get_json()
    response = client.patch(
        f"/fhir/Patient/{created['id']}", data=b"[1]", headers={"Content-Type": "application/merge-patch+json"}
    )
    assert response.status_code == 400
    assert issue(response)["expression"] == ["body"]


def test_conditional_patch_patches_the_single_match(client: FlaskClient) -> None:
    created = post(client, patient()).get_json()
    response = client.patch(
        f"/fhir/Patient?{MRN_QUERY}",
        data=orjson.dumps({"gender": "female"}),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["id"] == created["id"]
    assert response.headers["ETag"] == 'W/"2"'
    json_patch = client.patch(
        f"/fhir/Patient?{MRN_QUERY}",
        data=orjson.dumps([{"op": "replace", "path": "/gender", "value": "male"}]),
        headers={"Content-Type": "application/json-patch+json"},
    )
    assert json_patch.status_code == 200
    assert client.get(f"/fhir/Patient/{created['id']}").get_json()["gender"] == "male"


def test_conditional_patch_with_no_match_returns_404(client: FlaskClient) -> None:
    response = client.patch(
        "/fhir/Patient?identifier=MRN-nobody",
        data=orjson.dumps({"gender": "female"}),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 404
    assert issue(response)["code"] == "not-found"


def test_conditional_patch_with_two_matches_returns_412_and_changes_nothing(client: FlaskClient) -> None:
    post(client, patient())
    post(client, patient())
    response = client.patch(
        "/fhir/Patient?family=Rivera",
        data=orjson.dumps({"gender": "female"}),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 412
    assert client.get("/fhir/Patient?gender=female&_summary=count").get_json()["total"] == 0


def test_conditional_patch_without_a_condition_returns_400(client: FlaskClient) -> None:
    post(client, patient())
    response = client.patch(
        "/fhir/Patient", data=orjson.dumps({"gender": "female"}), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400


def test_empty_responses_carry_no_html_content_type(client: FlaskClient) -> None:
    created = post(client, patient(), Prefer="return=minimal")
    assert created.status_code == 201
    assert created.get_data() == b""
    assert "Content-Type" not in created.headers
    deleted = client.delete(created.headers["Location"].split("/_history")[0].replace("http://testserver", ""))
    assert deleted.status_code == 204
    assert "Content-Type" not in deleted.headers
