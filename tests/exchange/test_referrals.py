"""Inbound referrals from inpatient units: intake from the referral Task, staff decisions reflected on the Task with
BSeR business statuses, admission into an enrollment, and status changes pushed back to a referring partner."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from iop_fhir.errors import Invalid
from iop_fhir.exchange import referrals
from iop_fhir.mapping import ids

CONTRACT = Path(__file__).resolve().parents[3] / "shared" / "contract"
VALIDATOR = Path(__file__).resolve().parents[3] / "shared" / "tools" / "fhir-validate"
FHIR = "application/fhir+json"
BASE = "http://testserver/fhir"
PARTNER = {
    "id": "st-joseph-detox",
    "kind": "inpatient-unit",
    "name": "St. Joseph Inpatient Detoxification Unit",
    "fhir_base_url": "https://ehr.stjoseph.example/fhir/R4",
    "auth": {"type": "none"},
}
ADMISSION = {"program": "adult-sud", "level_of_care": "2.1", "admission_date": "2026-02-09"}


def inbound_bundle(requester: dict[str, Any] | None = None) -> dict[str, Any]:
    bundle: dict[str, Any] = json.loads((CONTRACT / "inbound-referral-bundle.json").read_text(encoding="utf-8"))
    if requester is not None:
        bundle["entry"][3]["resource"]["requester"] = requester
    return bundle


def post_bundle(client: Any, bundle: dict[str, Any]) -> dict[str, str]:
    """POST the transaction; the ids the server gave, by resource type."""
    response = client.post("/fhir", data=orjson.dumps(bundle), content_type=FHIR)
    assert response.status_code == 200, response.get_json()
    locations = [e["response"]["location"].split("/_history")[0] for e in response.get_json()["entry"]]
    return {location.split("/")[0]: location.split("/")[1] for location in locations}


def resources(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The bundle's resources with ids and resolved references, as the server stores them."""
    found = {e["resource"]["resourceType"]: copy.deepcopy(e["resource"]) for e in bundle["entry"]}
    urns = {
        e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource']['resourceType'].lower()}-1"
        for e in bundle["entry"]
    }
    text = json.dumps(found)
    for urn, reference in urns.items():
        text = text.replace(urn, reference)
    found = json.loads(text)
    for res_type, resource in found.items():
        resource["id"] = f"{res_type.lower()}-1"
    return found


def read(client: Any, reference: str) -> dict[str, Any]:
    response = client.get(f"/fhir/{reference}")
    assert response.status_code == 200
    body: dict[str, Any] = response.get_json()
    return body


def business_status(task: dict[str, Any]) -> str:
    coding = task["businessStatus"]["coding"][0]
    assert coding["system"] == referrals.BSER_STATUS
    return str(coding["code"])


def deliveries(app: Any, **filters: Any) -> list[Any]:
    rows, _ = app.extensions["iop_fhir.store"].deliveries(**filters)
    return list(rows)


@pytest.fixture
def referral_id(client: Any) -> str:
    task_id = post_bundle(client, inbound_bundle())["Task"]
    return task_id


def outcome_of(response: Any) -> tuple[str, str | None, str]:
    issue = response.get_json()["issue"][0]
    return issue["code"], (issue.get("expression") or [None])[0], issue["diagnostics"]


# -- pure ---------------------------------------------------------------------------------------------------------


def test_referral_from_reverse_maps_patient_diagnoses_requested_start_and_notes() -> None:
    found = resources(inbound_bundle())
    referral = referrals.referral_from(found["Task"], found["ServiceRequest"], found["Patient"], [found["Condition"]])
    assert referral["patient"] == {
        "identifiers": [{"system": "urn:oid:2.16.840.1.113883.19.5.99999.1", "value": "MRN-552310"}],
        "name": {"given": ["Chidi"], "family": "Okafor"},
        "birth_date": "1979-09-30",
        "gender": "male",
        "phone": "+1-973-555-0177",
    }
    assert referral["diagnoses"] == [
        {"system": "icd-10-cm", "code": "F11.20", "display": "Opioid dependence, uncomplicated"}
    ]
    assert referral["requested_start"] == "2026-02-09"
    assert referral["notes"] == [found["ServiceRequest"]["note"][0]["text"]]
    assert referral["referring"] == {"organization": "St. Joseph Inpatient Detoxification Unit", "partner": None}
    assert (referral["service_request"], referral["task"], referral["status"]) == (
        "ServiceRequest/servicerequest-1",
        "Task/task-1",
        "requested",
    )


def test_requested_start_may_be_an_occurrence_date_time() -> None:
    found = resources(inbound_bundle())
    service_request = found["ServiceRequest"]
    del service_request["occurrencePeriod"]
    service_request["occurrenceDateTime"] = "2026-02-10T09:00:00-05:00"
    referral = referrals.referral_from(found["Task"], service_request, None, [])
    assert referral["requested_start"] == "2026-02-10T09:00:00-05:00"
    assert referral["patient"] == {}
    assert referral["diagnoses"] == []


@pytest.mark.parametrize(
    "requester",
    [
        {"reference": "Organization/st-joseph-detox"},
        {"identifier": {"system": "https://iop-fhir.org/fhir/sid/partner", "value": "st-joseph-detox"}},
    ],
)
def test_a_partner_is_named_by_its_organization_or_its_partner_identifier(requester: dict[str, Any]) -> None:
    assert referrals.partner_named(requester) == "st-joseph-detox"


@pytest.mark.parametrize(
    "requester",
    [{"display": "St. Joseph"}, {"reference": "Practitioner/x"}, {"identifier": {"system": "urn:x", "value": "y"}}],
)
def test_other_requesters_name_no_partner(requester: dict[str, Any]) -> None:
    assert referrals.partner_named(requester) is None


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({}, True),
        ({"status": "draft"}, False),
        ({"intent": "plan"}, False),
        ({"focus": {"reference": "CarePlan/x"}}, False),
        ({"code": {"coding": [{"system": referrals.TASK_CODE, "code": "approve"}]}}, False),
        ({"identifier": [{"system": ids.RECORD_SYSTEM, "value": "discharge/d/referral-task"}]}, False),
    ],
)
def test_only_inbound_fulfil_requests_for_a_service_request_are_referrals(
    change: dict[str, Any], expected: bool
) -> None:
    task = {**resources(inbound_bundle())["Task"], **change}
    assert referrals.is_referral_task(task) is expected


@pytest.mark.parametrize(
    ("status", "changes", "task_status", "code", "reason"),
    [
        ("accepted", {"planned_admission": "2026-02-09"}, "accepted", "3.0", None),
        ("declined", {"decline_reason": "No openings this month"}, "rejected", "4.0", "No openings this month"),
        ("no-show", {"planned_admission": "2026-02-09"}, "failed", "5.1.2", "2026-02-09"),
        (
            "admitted",
            {"planned_admission": "2026-02-09", "episode_of_care": "EpisodeOfCare/e1"},
            "completed",
            "7.0",
            None,
        ),
    ],
)
def test_task_reflects_the_referral_status(
    status: str, changes: dict[str, Any], task_status: str, code: str, reason: str | None
) -> None:
    task = resources(inbound_bundle())["Task"]
    changed = referrals.task_for(task, {"status": status, **changes}, "2026-02-05T10:00:00Z")
    assert (changed["status"], business_status(changed)) == (task_status, code)
    if reason is None:
        assert "statusReason" not in changed
    else:
        assert reason in changed["statusReason"]["text"]
    assert changed["lastModified"] == "2026-02-05T10:00:00Z"
    outputs = {o["type"]["text"]: o for o in changed.get("output", [])}
    if "planned_admission" in changes:
        assert outputs["planned admission"]["valueDate"] == "2026-02-09"
    if "episode_of_care" in changes:
        assert outputs["episode of care"]["valueReference"] == {"reference": "EpisodeOfCare/e1"}


def test_outbound_task_points_at_this_server_and_carries_the_referrers_identifiers() -> None:
    found = resources(inbound_bundle())
    outbound = referrals.outbound_task(found["Task"], "task-1", BASE, found["ServiceRequest"], found["Patient"])
    assert outbound["focus"] == {
        "reference": f"{BASE}/ServiceRequest/servicerequest-1",
        "identifier": {"system": "https://ehr.stjoseph.example/referrals", "value": "REF-2026-0419"},
    }
    assert outbound["for"]["identifier"]["value"] == "MRN-552310"
    bundle = referrals.delivery_bundle(outbound)
    entry = bundle["entry"][0]
    assert entry["request"] == {
        "method": "PUT",
        "url": "Task?identifier=https://iop-fhir.org/fhir/sid/iop-record|referral/task-1/task",
    }
    assert "id" not in entry["resource"]
    assert "RedisclosureProhibitionMark" in [s["code"] for s in bundle["meta"]["security"]]


def test_a_task_with_the_referrers_own_identifier_is_updated_by_it_at_the_referrer() -> None:
    task = {
        **resources(inbound_bundle())["Task"],
        "identifier": [{"system": "https://ehr.example/tasks", "value": "T 7"}],
    }
    bundle = referrals.delivery_bundle(referrals.outbound_task(task, "task-1", BASE))
    assert bundle["entry"][0]["request"]["url"] == "Task?identifier=https://ehr.example/tasks|T%207"


def test_enrollment_for_takes_patient_diagnoses_and_referral_from_the_referral() -> None:
    found = resources(inbound_bundle())
    referral = referrals.referral_from(found["Task"], found["ServiceRequest"], found["Patient"], [found["Condition"]])
    payload = referrals.enrollment_for(referral, ADMISSION, BASE)
    assert payload["patient"] == referral["patient"]
    assert payload["diagnoses"] == referral["diagnoses"]
    assert payload["referral"] == {
        "source": "inpatient-step-down",
        "organization": "St. Joseph Inpatient Detoxification Unit",
        "service_request": f"{BASE}/ServiceRequest/servicerequest-1",
    }


def test_enrollment_for_refuses_another_service_request() -> None:
    found = resources(inbound_bundle())
    referral = referrals.referral_from(found["Task"], found["ServiceRequest"], found["Patient"], [])
    given = {**ADMISSION, "referral": {"source": "self", "service_request": "https://elsewhere.example/SR/1"}}
    with pytest.raises(Invalid) as raised:
        referrals.enrollment_for(referral, given, BASE)
    assert raised.value.issues[0].expression == "enrollment.referral.service_request"


# -- intake -------------------------------------------------------------------------------------------------------


def test_contract_bundle_creates_one_referral_with_the_reverse_mapped_fields(client: Any) -> None:
    created = post_bundle(client, inbound_bundle())
    listed = client.get("/iop/referrals").get_json()
    assert listed["total"] == 1
    referral = listed["items"][0]
    assert referral["id"] == created["Task"]
    assert referral["status"] == "requested"
    assert referral["task"] == f"Task/{created['Task']}"
    assert referral["service_request"] == f"ServiceRequest/{created['ServiceRequest']}"
    assert referral["patient"]["identifiers"][0]["value"] == "MRN-552310"
    assert referral["patient"]["name"] == {"given": ["Chidi"], "family": "Okafor"}
    assert referral["diagnoses"] == [
        {"system": "icd-10-cm", "code": "F11.20", "display": "Opioid dependence, uncomplicated"}
    ]
    assert referral["requested_start"] == "2026-02-09"
    assert referral["notes"][0].startswith("Completed 7-day medically managed withdrawal")
    assert referral["referring"] == {"organization": "St. Joseph Inpatient Detoxification Unit", "partner": None}
    assert client.get(f"/iop/referrals/{created['Task']}").get_json() == referral


def test_replayed_bundle_creates_no_second_referral_and_its_task_follows_the_first(client: Any) -> None:
    first = post_bundle(client, inbound_bundle())
    second = post_bundle(client, inbound_bundle())
    assert second["ServiceRequest"] == first["ServiceRequest"]
    assert second["Task"] != first["Task"]  # the Bundle's Task has no condition
    listed = client.get("/iop/referrals").get_json()
    assert [r["id"] for r in listed["items"]] == [first["Task"]]
    assert listed["items"][0]["duplicate_tasks"] == [f"Task/{second['Task']}"]
    assert (
        client.post(f"/iop/referrals/{first['Task']}/accept", json={"planned_admission": "2026-02-09"}).status_code
        == 200
    )
    assert [read(client, f"Task/{t}")["status"] for t in (first["Task"], second["Task"])] == ["accepted", "accepted"]


def test_a_task_we_send_to_an_aftercare_partner_is_not_an_inbound_referral(client: Any) -> None:
    task = resources(inbound_bundle())["Task"]
    created = post_bundle(client, inbound_bundle())
    task = {
        **task,
        "focus": {"reference": f"ServiceRequest/{created['ServiceRequest']}"},
        "for": {"reference": f"Patient/{created['Patient']}"},
        "identifier": [{"system": ids.RECORD_SYSTEM, "value": "discharge/d1/referral-task"}],
    }
    del task["id"]
    assert client.post("/fhir/Task", data=orjson.dumps(task), content_type=FHIR).status_code == 201
    assert client.get("/iop/referrals").get_json()["total"] == 1


# -- decisions ----------------------------------------------------------------------------------------------------


def search_tasks(client: Any, status: str) -> list[str]:
    bundle = client.get(f"/fhir/Task?status={status}").get_json()
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


def test_accept_makes_the_task_accepted_with_the_planned_admission(client: Any, referral_id: str) -> None:
    response = client.post(f"/iop/referrals/{referral_id}/accept", json={"planned_admission": "2026-02-09"})
    assert response.status_code == 200
    assert (response.get_json()["status"], response.get_json()["planned_admission"]) == ("accepted", "2026-02-09")
    task = read(client, f"Task/{referral_id}")
    assert (task["status"], business_status(task), task["meta"]["versionId"]) == ("accepted", "3.0", "2")
    assert {"type": {"text": "planned admission"}, "valueDate": "2026-02-09"} in task["output"]
    assert search_tasks(client, "accepted") == [referral_id]
    assert search_tasks(client, "requested") == []


def test_accepting_again_reschedules_the_admission(client: Any, referral_id: str) -> None:
    client.post(f"/iop/referrals/{referral_id}/accept", json={"planned_admission": "2026-02-09"})
    client.post(f"/iop/referrals/{referral_id}/accept", json={"planned_admission": "2026-02-11"})
    task = read(client, f"Task/{referral_id}")
    assert [o["valueDate"] for o in task["output"]] == ["2026-02-11"]


def test_decline_makes_the_task_rejected_with_the_reason(client: Any, referral_id: str) -> None:
    response = client.post(f"/iop/referrals/{referral_id}/decline", json={"reason": "Needs residential care (3.5)"})
    assert response.status_code == 200
    assert response.get_json()["status"] == "declined"
    task = read(client, f"Task/{referral_id}")
    assert (task["status"], business_status(task)) == ("rejected", "4.0")
    assert task["statusReason"] == {"text": "Needs residential care (3.5)"}
    assert search_tasks(client, "rejected") == [referral_id]


def test_no_show_makes_the_task_failed_with_bser_unattended(client: Any, referral_id: str) -> None:
    client.post(f"/iop/referrals/{referral_id}/accept", json={"planned_admission": "2026-02-09"})
    response = client.post(f"/iop/referrals/{referral_id}/no-show")
    assert response.status_code == 200
    assert response.get_json()["status"] == "no-show"
    task = read(client, f"Task/{referral_id}")
    assert (task["status"], business_status(task)) == ("failed", "5.1.2")
    assert "2026-02-09" in task["statusReason"]["text"]
    assert search_tasks(client, "failed") == [referral_id]


def test_admit_creates_the_enrollment_linked_to_the_service_request_and_completes_the_task(
    client: Any, referral_id: str
) -> None:
    client.post(f"/iop/referrals/{referral_id}/accept", json={"planned_admission": "2026-02-09"})
    response = client.post(f"/iop/referrals/{referral_id}/admit", json={"enrollment": ADMISSION})
    assert response.status_code == 200, response.get_json()
    referral = response.get_json()
    assert referral["status"] == "admitted"
    enrollment = client.get(f"/iop/enrollments/{referral['enrollment_id']}").get_json()
    link = f"{BASE}/{referral['service_request']}"
    assert enrollment["referral"]["service_request"] == link
    assert enrollment["patient"]["identifiers"][0]["value"] == "MRN-552310"
    assert enrollment["diagnoses"][0]["code"] == "F11.20"
    episode = read(client, referral["episode_of_care"])
    assert episode["referralRequest"][0]["reference"] == link
    task = read(client, f"Task/{referral_id}")
    assert (task["status"], business_status(task)) == ("completed", "7.0")
    assert {"type": {"text": "episode of care"}, "valueReference": {"reference": referral["episode_of_care"]}} in task[
        "output"
    ]
    assert search_tasks(client, "completed") == [referral_id]


def test_admit_errors_point_into_the_enrollment(client: Any, referral_id: str) -> None:
    client.post(f"/iop/referrals/{referral_id}/accept", json={"planned_admission": "2026-02-09"})
    payload = {k: v for k, v in ADMISSION.items() if k != "program"}
    response = client.post(f"/iop/referrals/{referral_id}/admit", json={"enrollment": payload})
    assert response.status_code == 400
    assert outcome_of(response)[:2] == ("required", "enrollment.program")
    assert read(client, f"Task/{referral_id}")["status"] == "accepted"


@pytest.mark.parametrize(
    ("steps", "action", "current"),
    [
        (["admit"], "decline", "admitted"),
        (["admit"], "no-show", "admitted"),
        (["decline"], "accept", "declined"),
        (["decline"], "decline", "declined"),
        ([], "no-show", "requested"),
        ([], "admit", "requested"),
        (["no-show"], "admit", "no-show"),
    ],
)
def test_illegal_transitions_are_refused_with_409_naming_the_current_status(
    client: Any, referral_id: str, steps: list[str], action: str, current: str
) -> None:
    bodies = {
        "accept": {"planned_admission": "2026-02-09"},
        "decline": {"reason": "No openings"},
        "no-show": {},
        "admit": {"enrollment": ADMISSION},
    }
    if steps and steps[0] in ("admit", "no-show"):
        client.post(f"/iop/referrals/{referral_id}/accept", json=bodies["accept"])
    for step in steps:
        assert client.post(f"/iop/referrals/{referral_id}/{step}", json=bodies[step]).status_code == 200
    before = read(client, f"Task/{referral_id}")["meta"]["versionId"]
    response = client.post(f"/iop/referrals/{referral_id}/{action}", json=bodies[action])
    assert response.status_code == 409
    code, expression, diagnostics = outcome_of(response)
    assert (code, expression) == ("business-rule", "status")
    assert f"is {current};" in diagnostics
    assert read(client, f"Task/{referral_id}")["meta"]["versionId"] == before


def test_a_task_changed_at_the_fhir_api_stops_the_referral(client: Any, referral_id: str) -> None:
    task = read(client, f"Task/{referral_id}")
    task["status"] = "cancelled"
    assert client.put(f"/fhir/Task/{referral_id}", data=orjson.dumps(task), content_type=FHIR).status_code == 200
    response = client.post(f"/iop/referrals/{referral_id}/accept", json={"planned_admission": "2026-02-09"})
    assert response.status_code == 409
    assert outcome_of(response)[1] == "task"
    assert client.get(f"/iop/referrals/{referral_id}").get_json()["status"] == "requested"


@pytest.mark.parametrize(
    ("path", "body", "expression"),
    [
        ("accept", {}, "planned_admission"),
        ("accept", {"planned_admission": "9 Feb"}, "planned_admission"),
        ("decline", {"reason": " "}, "reason"),
        ("no-show", {"when": "today"}, "when"),
        ("admit", {}, "enrollment"),
        ("admit", {"enrollment": ADMISSION, "extra": 1}, "extra"),
    ],
)
def test_invalid_decision_bodies_are_refused_naming_the_field(
    client: Any, referral_id: str, path: str, body: dict[str, Any], expression: str
) -> None:
    response = client.post(f"/iop/referrals/{referral_id}/{path}", json=body)
    assert response.status_code == 400
    assert outcome_of(response)[1] == expression


def test_unknown_referral_is_404(client: Any) -> None:
    assert client.get("/iop/referrals/nope").status_code == 404
    response = client.post("/iop/referrals/nope/decline", json={"reason": "x"})
    assert (response.status_code, outcome_of(response)[0]) == (404, "not-found")


def test_referrals_are_listed_by_status_and_paged(client: Any) -> None:
    ids_ = [post_bundle(client, inbound_bundle())["Task"]]
    for mrn in ("MRN-1", "MRN-2"):
        bundle = inbound_bundle()
        bundle["entry"][0]["resource"]["identifier"][0]["value"] = mrn
        bundle["entry"][0]["request"]["ifNoneExist"] = f"identifier=urn:oid:2.16.840.1.113883.19.5.99999.1|{mrn}"
        bundle["entry"][2]["resource"]["identifier"][0]["value"] = f"REF-{mrn}"
        bundle["entry"][2]["request"]["ifNoneExist"] = f"identifier=https://ehr.stjoseph.example/referrals|REF-{mrn}"
        ids_.append(post_bundle(client, bundle)["Task"])
    client.post(f"/iop/referrals/{ids_[1]}/decline", json={"reason": "No openings"})
    requested = client.get("/iop/referrals?status=requested").get_json()
    assert (requested["total"], [r["id"] for r in requested["items"]]) == (2, [ids_[0], ids_[2]])
    page = client.get("/iop/referrals?status=requested&offset=1&count=1").get_json()
    assert (page["total"], [r["id"] for r in page["items"]]) == (2, [ids_[2]])
    response = client.get("/iop/referrals?status=lost")
    assert (response.status_code, outcome_of(response)[1]) == (400, "status")


# -- back to the referring partner --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "requester",
    [
        {"reference": "Organization/st-joseph-detox"},
        {"identifier": {"system": "https://iop-fhir.org/fhir/sid/partner", "value": "st-joseph-detox"}},
    ],
)
def test_a_referral_from_a_known_partner_enqueues_one_delivery_per_status_change(
    app: Any, client: Any, requester: dict[str, Any]
) -> None:
    assert client.post("/iop/partners", json=PARTNER).status_code == 201
    referral_id = post_bundle(client, inbound_bundle(requester))["Task"]
    referral = client.get(f"/iop/referrals/{referral_id}").get_json()
    assert referral["referring"] == {"organization": PARTNER["name"], "partner": "st-joseph-detox"}
    assert deliveries(app, record_kind="referral") == []
    client.post(f"/iop/referrals/{referral_id}/accept", json={"planned_admission": "2026-02-09"})
    client.post(f"/iop/referrals/{referral_id}/admit", json={"enrollment": ADMISSION})
    rows = deliveries(app, record_kind="referral", record_id=referral_id)
    # The admission discloses a treatment record: without the patient's consent it waits (tests/exchange/
    # test_disclosures.py releases it with one).
    assert [(r.partner_id, r.kind, r.status) for r in rows] == [
        ("st-joseph-detox", "bundle", "pending"),
        ("st-joseph-detox", "bundle", "blocked"),
    ]
    sent = [r.payload["body"]["entry"][0]["resource"] for r in rows]
    assert [(t["status"], business_status(t)) for t in sent] == [("accepted", "3.0"), ("completed", "7.0")]
    assert sent[1]["focus"]["identifier"]["value"] == "REF-2026-0419"
    assert sent[1]["focus"]["reference"].startswith(f"{BASE}/ServiceRequest/")


def test_a_referral_naming_no_partner_enqueues_nothing(app: Any, client: Any, referral_id: str) -> None:
    client.post(f"/iop/referrals/{referral_id}/decline", json={"reason": "No openings"})
    assert deliveries(app, record_kind="referral") == []


def test_a_referral_naming_an_unknown_partner_enqueues_nothing(app: Any, client: Any) -> None:
    requester = {"identifier": {"system": "https://iop-fhir.org/fhir/sid/partner", "value": "nobody"}, "display": "X"}
    referral_id = post_bundle(client, inbound_bundle(requester))["Task"]
    assert client.get(f"/iop/referrals/{referral_id}").get_json()["referring"]["partner"] is None
    client.post(f"/iop/referrals/{referral_id}/decline", json={"reason": "No openings"})
    assert deliveries(app, record_kind="referral") == []


def test_the_updated_task_and_its_delivery_are_valid_fhir(sqlite_app: Any, sqlite_client: Any, tmp_path: Path) -> None:
    client = sqlite_client
    assert client.post("/iop/partners", json=PARTNER).status_code == 201
    referral_id = post_bundle(client, inbound_bundle({"reference": "Organization/st-joseph-detox"}))["Task"]
    client.post(f"/iop/referrals/{referral_id}/accept", json={"planned_admission": "2026-02-09"})
    assert client.post(f"/iop/referrals/{referral_id}/admit", json={"enrollment": ADMISSION}).status_code == 200
    (tmp_path / "task.json").write_text(json.dumps(read(client, f"Task/{referral_id}")), encoding="utf-8")
    for n, row in enumerate(deliveries(sqlite_app, record_kind="referral")):
        (tmp_path / f"delivery-{n}.json").write_text(json.dumps(row.payload["body"]), encoding="utf-8")
    result = subprocess.run([str(VALIDATOR), str(tmp_path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# -- reverse mapping through the engine, and one Patient per person ------------------------------------------------


def _engine() -> Any:
    from iop_fhir.mapping import load_engine

    return load_engine((Path(__file__).resolve().parents[2] / "mappings").resolve())


def _inpatient_patient() -> dict[str, Any]:
    """A referring unit's Patient with US Core race and ethnicity, an address and a preferred language (the shape
    another system sends: no iop-record identifier, a mobile phone, an official name among others)."""
    return {
        "resourceType": "Patient",
        "id": "patient-1",
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5.99999.1", "value": "MRN-551207"}],
        "extension": [
            {
                "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
                "extension": [
                    {
                        "url": "ombCategory",
                        "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2054-5"},
                    },
                    {"url": "text", "valueString": "Black or African American"},
                ],
            },
            {
                "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity",
                "extension": [
                    {
                        "url": "ombCategory",
                        "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2186-5"},
                    },
                    {"url": "text", "valueString": "Not Hispanic or Latino"},
                ],
            },
        ],
        "name": [
            {"use": "nickname", "family": "B", "given": ["Marc"]},
            {"use": "official", "family": "Bell", "given": ["Marcus"]},
        ],
        "telecom": [{"system": "phone", "value": "+1-973-555-0177", "use": "mobile"}],
        "gender": "male",
        "birthDate": "1979-09-30",
        "address": [{"line": ["9 Lakeview Ave"], "city": "Clifton", "state": "NJ", "postalCode": "07011"}],
        "communication": [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "en"}]}, "preferred": True}],
    }


def test_referral_from_reads_the_patient_and_conditions_back_through_the_enrollment_mapping() -> None:
    found = resources(inbound_bundle())
    patient = _inpatient_patient()
    referral = referrals.referral_from(found["Task"], found["ServiceRequest"], patient, [found["Condition"]], _engine())
    # what only the engine's reverse mapping reads, in the enrollment's vocabularies
    assert referral["patient"]["race"] == ["black-or-african-american"]
    assert referral["patient"]["ethnicity"] == "not-hispanic-or-latino"
    assert referral["patient"]["preferred_language"] == "en"
    assert referral["patient"]["address"] == {
        "line": ["9 Lakeview Ave"],
        "city": "Clifton",
        "state": "NJ",
        "postal_code": "07011",
    }
    # the rest as before: the official name, identifiers with a system, the phone
    assert referral["patient"]["name"] == {"given": ["Marcus"], "family": "Bell"}
    assert referral["patient"]["identifiers"] == [
        {"system": "urn:oid:2.16.840.1.113883.19.5.99999.1", "value": "MRN-551207"}
    ]
    assert (referral["patient"]["gender"], referral["patient"]["birth_date"]) == ("male", "1979-09-30")
    assert referral["diagnoses"] == [
        {"system": "icd-10-cm", "code": "F11.20", "display": "Opioid dependence, uncomplicated"}
    ]
    # the patient read back is a valid enrollment patient: admission can start from it
    from iop_fhir.iop import schemas

    payload = referrals.enrollment_for(referral, ADMISSION, BASE)
    assert schemas.load("enrollment", payload)["patient"]["race"] == ["black-or-african-american"]


def test_a_service_request_reason_code_is_still_a_diagnosis_next_to_the_conditions_read_back() -> None:
    found = resources(inbound_bundle())
    service_request = copy.deepcopy(found["ServiceRequest"])
    service_request["reasonCode"] = [{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "F10.20"}]}]
    referral = referrals.referral_from(
        found["Task"], service_request, found["Patient"], [found["Condition"]], _engine()
    )
    assert [d["code"] for d in referral["diagnoses"]] == ["F11.20", "F10.20"]


def test_the_intake_hook_uses_the_engine(client: Any) -> None:
    bundle = inbound_bundle()
    patient = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    patient["resource"]["extension"] = _inpatient_patient()["extension"]
    post_bundle(client, bundle)
    referral = client.get("/iop/referrals").get_json()["items"][0]
    assert referral["patient"]["race"] == ["black-or-african-american"]


def test_an_admitted_referral_enrolls_the_patient_the_referral_brought(client: Any, referral_id: str) -> None:
    referral = client.get(f"/iop/referrals/{referral_id}").get_json()
    task = read(client, referral["task"])
    referred_patient = task["for"]["reference"]
    client.post(f"/iop/referrals/{referral_id}/accept", json={"planned_admission": "2026-02-09"})
    response = client.post(f"/iop/referrals/{referral_id}/admit", json={"enrollment": ADMISSION})
    assert response.status_code == 200, response.get_json()
    enrollment = client.get(f"/iop/enrollments/{response.get_json()['enrollment_id']}").get_json()
    assert [r for r in enrollment["fhir"] if r.startswith("Patient/")] == [referred_patient]
    patients = client.get("/fhir/Patient?identifier=urn:oid:2.16.840.1.113883.19.5.99999.1|MRN-552310").get_json()
    assert [e["resource"]["id"] for e in patients["entry"]] == [referred_patient.split("/")[1]]
    episode = read(client, response.get_json()["episode_of_care"])
    assert episode["patient"]["reference"] == referred_patient


def test_a_referral_of_a_former_patient_attaches_to_the_patient_we_already_have(client: Any) -> None:
    earlier = json.loads((CONTRACT / "enrollment.json").read_text(encoding="utf-8"))
    earlier["patient"]["identifiers"] = [{"system": "urn:oid:2.16.840.1.113883.19.5.99999.1", "value": "MRN-552310"}]
    earlier["patient"]["birth_date"] = "1979-09-30"
    first = client.post("/iop/enrollments", json=earlier)
    assert first.status_code == 201, first.get_json()
    [person] = [r for r in first.get_json()["fhir"] if r.startswith("Patient/")]

    # the unit's Bundle creates its Patient only if none has the MRN: the referral is about the person we know
    task_id = post_bundle(client, inbound_bundle())["Task"]
    assert read(client, f"Task/{task_id}")["for"]["reference"] == person
    client.post(f"/iop/referrals/{task_id}/accept", json={"planned_admission": "2026-02-09"})
    admission = {**ADMISSION, "admission_date": "2026-02-10"}
    response = client.post(f"/iop/referrals/{task_id}/admit", json={"enrollment": admission})
    assert response.status_code == 200, response.get_json()
    second = client.get(f"/iop/enrollments/{response.get_json()['enrollment_id']}").get_json()
    assert [r for r in second["fhir"] if r.startswith("Patient/")] == [person]
    patients = client.get("/fhir/Patient?identifier=urn:oid:2.16.840.1.113883.19.5.99999.1|MRN-552310").get_json()
    assert len(patients["entry"]) == 1
    episodes = client.get(f"/fhir/EpisodeOfCare?patient={person}").get_json()
    assert len(episodes["entry"]) == 2
