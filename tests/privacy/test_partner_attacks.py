"""A partner's client attacks the 42 CFR Part 2 protection (issue 14): it tries to grant itself a consent or widen what
it sees, to write into a hidden patient's records, to read the past versions and deletions of a hidden patient, to
test a hidden patient's values through chains, to walk _include:iterate through hidden resources and to tell a hidden
resource from one that never existed; and whatever it receives must carry the Part 2 labels.

The scenario is ``program`` of tests/privacy/scenario.py: patient A consented to disclosure to the partner, patient B
did not. The attacker holds a partner's token with ``system/*.cruds`` unless a test says otherwise. On SQLite and
PostgreSQL.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient

from iop_fhir.mapping.engine import PART2_LABELS
from iop_fhir.r4 import search as search_rules
from tests.auth import mint
from tests.privacy.scenario import CONTRACT, FHIR, PARTNER, as_client, contract, issue

ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
JSON_PATCH = "application/json-patch+json"
MRN = "urn:oid:2.16.840.1.113883.19.5.99999.1"  # the enrollment contract's identifier system
FORGED = "https://attacker.example/records"  # identifiers the attacker makes up
SMOKING = "http://loinc.org|72166-2"  # the code of B's Observation that the chains test for
NOT_SMOKING = "http://loinc.org|11111-1"
REFERRAL_SCOPES = "system/Patient.crs system/Condition.crs system/ServiceRequest.crs system/Task.crus"
# What every resource disclosed to a partner carries on itself, whether or not it was stored with labels.
DISCLOSED_LABELS = {(label["system"], label["code"]) for label in PART2_LABELS if label["code"] in ("R", "42CFRPart2")}
MARK = (ACT_CODE, "RedisclosureProhibitionMark")


# -- requests -------------------------------------------------------------------------------------------------


def send(client: FlaskClient, method: str, path: str, body: Any, **headers: str) -> Any:
    content_type = JSON_PATCH if method == "PATCH" else FHIR
    return client.open(path, method=method, data=orjson.dumps(body), content_type=content_type, headers=headers)


def create(client: FlaskClient, res_type: str, body: dict[str, Any]) -> str:
    response = send(client, "POST", f"/fhir/{res_type}", {"resourceType": res_type, **body})
    assert response.status_code == 201, response.get_json()
    res_id: str = response.get_json()["id"]
    return res_id


def read(client: FlaskClient, reference: str) -> dict[str, Any]:
    response = client.get(f"/fhir/{reference}")
    assert response.status_code == 200, response.get_json()
    resource: dict[str, Any] = response.get_json()
    return resource


def total(client: FlaskClient, query: str) -> int:
    response = client.get(f"/fhir/{query}{'&' if '?' in query else '?'}_total=accurate")
    assert response.status_code == 200, response.get_json()
    found: int = response.get_json()["total"]
    return found


def references(bundle: dict[str, Any]) -> set[str]:
    return {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle.get("entry", [])}


def transaction(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def never_existed() -> str:
    """An id of the same shape as the stored ones that no resource ever had."""
    return str(uuid.uuid4())


def masked(value: Any, *secrets: str) -> Any:
    """``value`` (JSON) with every ``secret`` (an id or value probed), as given or URL-encoded, replaced by one
    placeholder, less what differs between any two responses (a Bundle's random id, its lastUpdated)."""
    text = orjson.dumps(value).decode()
    for secret in secrets:
        text = text.replace(secret, "<probed>").replace(quote(secret, safe=":/,*"), "<probed>")
    found = orjson.loads(text)
    if isinstance(found, dict):
        found.pop("id", None)
        found.pop("timestamp", None)
        if isinstance(found.get("meta"), dict):
            found["meta"].pop("lastUpdated", None)
    return found


def answer(response: Any, *secrets: str) -> tuple[int, Any, list[str]]:
    """What a response tells a client: its status, its body with the probed ``secrets`` masked, and the headers that
    would name a version or a location."""
    body = response.get_json() if response.get_data() else None
    headers = [h for h in ("ETag", "Last-Modified", "Location", "Content-Location") if h in response.headers]
    return response.status_code, masked(body, *secrets), headers


def assert_forbidden(response: Any, mention: str) -> None:
    assert response.status_code == 403, response.get_json()
    assert issue(response)["code"] == "forbidden"
    assert mention.lower() in issue(response)["diagnostics"].lower(), issue(response)


def security(resource: dict[str, Any]) -> set[tuple[str, str]]:
    return {(s.get("system"), s.get("code")) for s in (resource.get("meta") or {}).get("security", [])}


# -- the scenario ---------------------------------------------------------------------------------------------


@pytest.fixture
def attacker(app: Flask, program: dict[str, Any]) -> FlaskClient:
    """A partner's client that may do anything its scopes name: system/*.cruds."""
    return as_client(app, mint(app, "system/*.cruds", partner=PARTNER))


@pytest.fixture
def consent_of_a(client: FlaskClient, program: dict[str, Any]) -> dict[str, Any]:
    """A's FHIR Consent (made through /iop/consents), as stored."""
    bundle = client.get(f"/fhir/Consent?patient={program['a']['patient']}").get_json()
    [entry] = bundle["entry"]
    resource: dict[str, Any] = entry["resource"]
    return resource


def granting(consent: dict[str, Any], patient: str) -> dict[str, Any]:
    """A copy of ``consent`` for ``patient``: a Consent that would disclose that patient's records to the partner."""
    forged = copy.deepcopy(consent)
    del forged["id"]
    forged["meta"] = {k: v for k, v in forged["meta"].items() if k not in ("versionId", "lastUpdated")}
    forged["identifier"] = [{"system": FORGED, "value": "consent-1"}]
    forged["patient"] = {"reference": patient}
    return forged


def observation(patient: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "craving"},
        "subject": {"reference": patient},
        **extra,
    }


def session_of(client: FlaskClient, patient: str) -> str:
    """The session Encounter the program recorded for ``patient``."""
    bundle = client.get(f"/fhir/Encounter?subject={patient}").get_json()
    return f"Encounter/{bundle['entry'][0]['resource']['id']}"


def assert_b_still_hidden(partner: FlaskClient, client: FlaskClient, program: dict[str, Any]) -> None:
    """Nothing grants B's records to the partner: B has no Consent and the partner sees none of B's records."""
    b = program["b"]["patient"]
    assert total(client, f"Consent?patient={b}") == 0
    assert partner.get(f"/fhir/{b}").status_code == 404
    assert partner.get(f"/fhir/{program['b']['episode']}").status_code == 404
    assert total(partner, f"Encounter?subject={b}") == 0


# -- 1. consent authority -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("POST", "/fhir/Consent", {}),
        ("POST", "/fhir/Consent", {"If-None-Exist": f"identifier={FORGED}|consent-1"}),
        ("PUT", f"/fhir/Consent?identifier={FORGED}|consent-1", {}),
    ],
    ids=["create", "conditional-create", "conditional-update"],
)
def test_a_partner_can_never_create_a_consent(
    attacker: FlaskClient,
    client: FlaskClient,
    program: dict[str, Any],
    consent_of_a: dict[str, Any],
    method: str,
    path: str,
    headers: dict[str, str],
) -> None:
    response = send(attacker, method, path, granting(consent_of_a, program["b"]["patient"]), **headers)
    assert_forbidden(response, "consent")
    assert total(client, f"Consent?identifier={FORGED}|consent-1") == 0
    assert_b_still_hidden(attacker, client, program)


@pytest.mark.parametrize("change", ["update", "patch", "delete"])
def test_a_partner_can_never_change_or_delete_a_consent(
    attacker: FlaskClient, client: FlaskClient, program: dict[str, Any], consent_of_a: dict[str, Any], change: str
) -> None:
    reference = f"Consent/{consent_of_a['id']}"
    b = program["b"]["patient"]
    if change == "update":
        response = send(attacker, "PUT", f"/fhir/{reference}", {**consent_of_a, "patient": {"reference": b}})
    elif change == "patch":
        response = send(
            attacker, "PATCH", f"/fhir/{reference}", [{"op": "replace", "path": "/patient/reference", "value": b}]
        )
    else:
        response = attacker.delete(f"/fhir/{reference}")
    assert_forbidden(response, "consent")
    assert read(client, reference) == consent_of_a
    assert_b_still_hidden(attacker, client, program)


def test_a_consent_in_a_partners_transaction_fails_the_whole_transaction(
    attacker: FlaskClient, client: FlaskClient, program: dict[str, Any], consent_of_a: dict[str, Any]
) -> None:
    marker = observation(program["a"]["patient"], identifier=[{"system": FORGED, "value": "beside-a-consent"}])
    bundle = transaction(
        "transaction",
        {"fullUrl": urn(), "resource": marker, "request": {"method": "POST", "url": "Observation"}},
        {
            "fullUrl": urn(),
            "resource": granting(consent_of_a, program["b"]["patient"]),
            "request": {"method": "POST", "url": "Consent"},
        },
    )
    response = send(attacker, "POST", "/fhir", bundle)
    assert_forbidden(response, "consent")
    assert issue(response)["expression"][0].startswith("Bundle.entry[1]")
    assert total(client, f"Observation?identifier={FORGED}|beside-a-consent") == 0
    assert_b_still_hidden(attacker, client, program)


def test_a_consent_in_a_partners_batch_is_refused_and_the_other_entries_run(
    attacker: FlaskClient, client: FlaskClient, program: dict[str, Any], consent_of_a: dict[str, Any]
) -> None:
    bundle = transaction(
        "batch",
        {
            "fullUrl": urn(),
            "resource": granting(consent_of_a, program["b"]["patient"]),
            "request": {"method": "POST", "url": "Consent"},
        },
        {"request": {"method": "GET", "url": program["a"]["patient"]}},
    )
    response = send(attacker, "POST", "/fhir", bundle)
    assert response.status_code == 200, response.get_json()
    refused, read_of_a = response.get_json()["entry"]
    assert refused["response"]["status"].startswith("403")
    assert refused["response"]["outcome"]["issue"][0]["code"] == "forbidden"
    assert read_of_a["response"]["status"].startswith("200")
    assert read_of_a["resource"]["id"] == program["a"]["patient"].split("/")[1]
    assert_b_still_hidden(attacker, client, program)


@pytest.mark.parametrize("change", ["create", "update", "patch", "delete"])
def test_a_partner_can_never_write_a_group(
    attacker: FlaskClient, client: FlaskClient, program: dict[str, Any], change: str
) -> None:
    """Group membership decides what a Group export holds."""
    members = [{"entity": {"reference": program["a"]["patient"]}}]
    group = f"Group/{create(client, 'Group', {'type': 'person', 'actual': True, 'member': members})}"
    before = read(client, group)
    of_b = {"entity": {"reference": program["b"]["patient"]}}
    with_b = {**before, "member": [*members, of_b]}
    if change == "create":
        response = send(attacker, "POST", "/fhir/Group", {k: v for k, v in with_b.items() if k not in ("id", "meta")})
    elif change == "update":
        response = send(attacker, "PUT", f"/fhir/{group}", with_b)
    elif change == "patch":
        response = send(attacker, "PATCH", f"/fhir/{group}", [{"op": "add", "path": "/member/-", "value": of_b}])
    else:
        response = attacker.delete(f"/fhir/{group}")
    assert_forbidden(response, "group")
    assert read(client, group) == before
    assert total(client, "Group") == 1


@pytest.mark.parametrize("change", ["update", "patch"])
def test_a_partner_can_never_change_the_links_of_a_patient(
    attacker: FlaskClient, client: FlaskClient, program: dict[str, Any], change: str
) -> None:
    a = program["a"]["patient"]
    before = read(client, a)
    link = {"other": {"reference": program["b"]["patient"]}, "type": "seealso"}
    if change == "update":
        response = send(attacker, "PUT", f"/fhir/{a}", {**before, "link": [link]})
    else:
        response = send(attacker, "PATCH", f"/fhir/{a}", [{"op": "add", "path": "/link", "value": [link]}])
    assert_forbidden(response, "link")
    assert read(client, a) == before
    assert_b_still_hidden(attacker, client, program)


def _condition_of_a(client: FlaskClient, program: dict[str, Any]) -> str:
    bundle = client.get(f"/fhir/Condition?subject={program['a']['patient']}").get_json()
    return f"Condition/{bundle['entry'][0]['resource']['id']}"


ADDED_LABEL = {"system": ACT_CODE, "code": "DELAU", "display": "delete after use"}


def relabelled(labels: list[dict[str, Any]], change: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The stored labels with the first one (R) removed or changed to N: as the new meta.security of a PUT, and as
    a JSON Patch."""
    if change == "remove":
        return labels[1:], [{"op": "remove", "path": "/meta/security/0"}]
    normal = {"system": labels[0]["system"], "code": "N", "display": "normal"}
    return [normal, *labels[1:]], [{"op": "replace", "path": "/meta/security/0/code", "value": "N"}]


@pytest.mark.parametrize("how", ["update", "patch"])
@pytest.mark.parametrize("change", ["remove", "change"])
def test_a_partner_can_never_remove_or_change_a_security_label(
    attacker: FlaskClient, client: FlaskClient, program: dict[str, Any], change: str, how: str
) -> None:
    condition = _condition_of_a(client, program)
    before = read(client, condition)
    assert before["meta"]["security"][0]["code"] == "R"  # the label the changes touch
    labels, operations = relabelled(before["meta"]["security"], change)
    if how == "update":
        changed = {**before, "meta": {**before["meta"], "security": labels}}
        response = send(attacker, "PUT", f"/fhir/{condition}", changed)
    else:
        response = send(attacker, "PATCH", f"/fhir/{condition}", operations)
    assert response.status_code == 403, response.get_json()
    assert issue(response)["code"] == "forbidden"
    diagnostics = issue(response)["diagnostics"].lower()
    assert "label" in diagnostics or "security" in diagnostics, diagnostics
    assert read(client, condition) == before


@pytest.mark.parametrize("how", ["update", "patch"])
def test_a_partner_may_add_a_security_label(
    attacker: FlaskClient, client: FlaskClient, program: dict[str, Any], how: str
) -> None:
    condition = _condition_of_a(client, program)
    before = read(client, condition)
    if how == "update":
        labels = [*before["meta"]["security"], ADDED_LABEL]
        response = send(
            attacker, "PUT", f"/fhir/{condition}", {**before, "meta": {**before["meta"], "security": labels}}
        )
    else:
        response = send(
            attacker, "PATCH", f"/fhir/{condition}", [{"op": "add", "path": "/meta/security/-", "value": ADDED_LABEL}]
        )
    assert response.status_code == 200, response.get_json()
    after = read(client, condition)["meta"]["security"]
    assert all(label in after for label in before["meta"]["security"])
    assert ADDED_LABEL in after


def test_a_program_client_without_the_consent_permission_cannot_write_consents_through_fhir(
    app: Flask, client: FlaskClient, program: dict[str, Any], consent_of_a: dict[str, Any]
) -> None:
    plain = as_client(app, mint(app, "system/*.cruds"))
    response = send(plain, "POST", "/fhir/Consent", granting(consent_of_a, program["b"]["patient"]))
    assert_forbidden(response, "consent")
    assert total(client, f"Consent?patient={program['b']['patient']}") == 0
    # The /iop consent endpoints stay the program's way to record a consent.
    consent = contract("consent", program["b"]["enrollment"])
    consent.update(signed_on="2026-01-01", expires_on="2099-01-01")
    assert plain.post("/iop/consents", json=consent).status_code == 201
    assert program["partner"].get(f"/fhir/{program['b']['patient']}").status_code == 200


def test_a_program_client_with_the_consent_permission_writes_consents_through_fhir(
    app: Flask, client: FlaskClient, program: dict[str, Any], consent_of_a: dict[str, Any]
) -> None:
    manager = as_client(app, mint(app, "system/*.cruds", consents=True))
    response = send(manager, "POST", "/fhir/Consent", granting(consent_of_a, program["b"]["patient"]))
    assert response.status_code == 201, response.get_json()
    assert read(client, f"Consent/{response.get_json()['id']}")["patient"] == {"reference": program["b"]["patient"]}
    assert program["partner"].get(f"/fhir/{program['b']['patient']}").status_code == 200


@pytest.mark.parametrize("order", ["as-sent", "patient-last"])
def test_a_partner_with_referral_scopes_still_posts_the_inbound_referral_transaction(
    app: Flask, client: FlaskClient, program: dict[str, Any], order: str
) -> None:
    referrer = as_client(app, mint(app, REFERRAL_SCOPES, partner=PARTNER))
    bundle = orjson.loads((CONTRACT / "inbound-referral-bundle.json").read_bytes())
    if order == "patient-last":  # the entries that refer to the new Patient come before it
        bundle["entry"] = bundle["entry"][1:] + bundle["entry"][:1]
    response = send(referrer, "POST", "/fhir", bundle)
    assert response.status_code == 200, response.get_json()
    statuses = [e["response"]["status"] for e in response.get_json()["entry"]]
    assert [s.split()[0] for s in statuses] == ["201"] * 4
    assert total(client, "ServiceRequest?identifier=https://ehr.stjoseph.example/referrals|REF-2026-0419") == 1


# -- 2. a partner's writes never touch another patient's records ----------------------------------------------


def test_a_partner_write_about_a_hidden_patient_is_answered_as_about_a_patient_that_never_existed(
    attacker: FlaskClient, client: FlaskClient, program: dict[str, Any]
) -> None:
    b, nobody = program["b"]["patient"], f"Patient/{never_existed()}"
    before = total(client, f"Observation?subject={b}")
    hidden = send(attacker, "POST", "/fhir/Observation", observation(b))
    unknown = send(attacker, "POST", "/fhir/Observation", observation(nobody))
    for response in (hidden, unknown):
        assert response.status_code == 422, response.get_json()
        assert issue(response)["code"] == "processing"
        assert issue(response)["expression"] == ["Observation.subject"]
    assert answer(hidden, b.split("/")[1]) == answer(unknown, nobody.split("/")[1])
    assert total(client, f"Observation?subject={b}") == before
    assert total(client, f"Observation?subject={nobody}") == 0


# -- 3. visibility per version --------------------------------------------------------------------------------


def moved_from_b_to_a(client: FlaskClient, program: dict[str, Any]) -> str:
    """An Observation the program recorded for B (version 1), then corrected to be A's (version 2)."""
    res_id = create(client, "Observation", observation(program["b"]["patient"]))
    moved = {**observation(program["a"]["patient"]), "id": res_id}
    assert send(client, "PUT", f"/fhir/Observation/{res_id}", moved).status_code == 200
    return res_id


def _history(client: FlaskClient, path: str) -> dict[str, Any]:
    response = client.get(f"{path}?_count=1000")
    assert response.status_code == 200, response.get_json()
    bundle: dict[str, Any] = response.get_json()
    return bundle


@pytest.mark.parametrize("level", ["instance", "type", "system"])
def test_history_shows_a_partner_only_the_versions_that_belonged_to_a_consented_patient(
    client: FlaskClient, program: dict[str, Any], level: str
) -> None:
    partner = program["partner"]
    paths = {"type": "/fhir/Observation/_history", "system": "/fhir/_history"}
    before = _history(partner, paths[level])["total"] if level in paths else 0
    res_id = moved_from_b_to_a(client, program)
    bundle = _history(partner, paths.get(level, f"/fhir/Observation/{res_id}/_history"))
    versions = [e["response"]["etag"] for e in bundle["entry"] if e["fullUrl"].endswith(f"/Observation/{res_id}")]
    assert versions == ['W/"2"']
    assert bundle["total"] == before + 1
    assert program["b"]["patient"] not in orjson.dumps(bundle).decode()


def test_a_partner_vread_of_a_version_that_was_a_hidden_patients_is_answered_as_a_version_that_never_existed(
    client: FlaskClient, program: dict[str, Any]
) -> None:
    partner = program["partner"]
    res_id = moved_from_b_to_a(client, program)
    assert partner.get(f"/fhir/Observation/{res_id}/_history/2").status_code == 200
    was_b = partner.get(f"/fhir/Observation/{res_id}/_history/1")
    never = partner.get(f"/fhir/Observation/{res_id}/_history/99")
    for response in (was_b, never):
        assert response.status_code == 404, response.get_json()
        assert issue(response)["code"] == "not-found"
    # The same answer but for the version number asked for (the id masked first: it may hold "99" itself).
    as_asked = orjson.loads(never.get_data(as_text=True).replace(res_id, "<id>").replace("99", "1"))
    assert orjson.loads(was_b.get_data(as_text=True).replace(res_id, "<id>")) == as_asked
    assert "ETag" not in was_b.headers and "Last-Modified" not in was_b.headers


def deleted_of_b(client: FlaskClient, program: dict[str, Any], res_type: str) -> str:
    """A record of B the program deleted: an Observation it recorded for the purpose, or B's session Encounter."""
    if res_type == "Observation":
        reference = f"Observation/{create(client, 'Observation', observation(program['b']['patient']))}"
    else:
        reference = session_of(client, program["b"]["patient"])
    assert client.delete(f"/fhir/{reference}").status_code == 204
    assert client.get(f"/fhir/{reference}").status_code == 410
    return reference


def _probe(client: FlaskClient, probe: str, res_type: str, res_id: str) -> Any:
    """One request of ``probe`` on ``res_type/res_id``."""
    reference = f"{res_type}/{res_id}"
    if probe == "read":
        return client.get(f"/fhir/{reference}")
    if probe == "vread":
        return client.get(f"/fhir/{reference}/_history/1")
    if probe == "history":
        return client.get(f"/fhir/{reference}/_history")
    if probe == "patch":
        return send(client, "PATCH", f"/fhir/{reference}", [{"op": "replace", "path": "/status", "value": "cancelled"}])
    if probe in ("batch-get", "transaction-get"):
        bundle = transaction(probe.split("-")[0], {"request": {"method": "GET", "url": reference}})
        return send(client, "POST", "/fhir", bundle)
    raise AssertionError(probe)


@pytest.mark.parametrize("probe", ["read", "vread", "history", "patch", "batch-get", "transaction-get"])
@pytest.mark.parametrize("res_type", ["Observation", "Encounter"])
def test_a_hidden_patients_deleted_resource_is_answered_as_one_that_never_existed(
    attacker: FlaskClient, client: FlaskClient, program: dict[str, Any], res_type: str, probe: str
) -> None:
    hidden = deleted_of_b(client, program, res_type).split("/")[1]
    nobody = never_existed()
    deleted, unknown = _probe(attacker, probe, res_type, hidden), _probe(attacker, probe, res_type, nobody)
    assert answer(deleted, hidden) == answer(unknown, nobody)
    assert deleted.status_code == (200 if probe == "batch-get" else 404), deleted.get_json()
    assert "ETag" not in deleted.headers and "Last-Modified" not in deleted.headers
    if probe == "batch-get":
        assert deleted.get_json()["entry"][0]["response"]["status"].startswith("404")
    else:
        assert issue(deleted)["code"] == "not-found"
    assert client.get(f"/fhir/{res_type}/{hidden}").status_code == 410  # the attack changed nothing


@pytest.mark.parametrize("path", ["/fhir/Observation/_history", "/fhir/_history"])
def test_type_and_system_history_never_show_a_hidden_patients_deleted_resource(
    client: FlaskClient, program: dict[str, Any], path: str
) -> None:
    hidden = deleted_of_b(client, program, "Observation").split("/")[1]
    assert hidden not in orjson.dumps(_history(program["partner"], path)).decode()


# -- 4. chains apply the restriction at every hop -------------------------------------------------------------


@pytest.fixture
def through_b(client: FlaskClient, program: dict[str, Any]) -> dict[str, str]:
    """Visible records of A that refer to hidden records of B: an Observation derived from (and grouping) one of B's,
    which a Practitioner performed and a Provenance names, and an Encounter that is part of B's session."""
    a, b = program["a"]["patient"], program["b"]["patient"]
    practitioner = create(client, "Practitioner", {"name": [{"family": "Onlyb"}]})
    of_b = create(
        client,
        "Observation",
        observation(
            b,
            code={"coding": [{"system": "http://loinc.org", "code": "72166-2"}]},
            performer=[{"reference": f"Practitioner/{practitioner}"}],
        ),
    )
    provenance = create(
        client,
        "Provenance",
        {
            "target": [{"reference": f"Observation/{of_b}"}],
            "recorded": "2026-01-07T18:00:00Z",
            "agent": [{"who": {"display": "Dana Whitfield, LCADC"}}],
        },
    )
    of_a = create(
        client,
        "Observation",
        observation(
            a,
            derivedFrom=[{"reference": f"Observation/{of_b}"}],
            hasMember=[{"reference": f"Observation/{of_b}"}],
        ),
    )
    encounter = create(
        client,
        "Encounter",
        {
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": a},
            "partOf": {"reference": session_of(client, b)},
        },
    )
    return {
        "of_a": f"Observation/{of_a}",
        "of_b": f"Observation/{of_b}",
        "practitioner": f"Practitioner/{practitioner}",
        "provenance": f"Provenance/{provenance}",
        "encounter_of_a": f"Encounter/{encounter}",
    }


CHAINS = [
    # (query with {value}, B's value, a wrong guess); {b} is B's Patient, {nobody} a Patient that never existed
    ("Observation?derived-from:Observation.code={value}", SMOKING, NOT_SMOKING),
    ("Observation?has-member:Observation.code={value}", SMOKING, NOT_SMOKING),
    ("Observation?derived-from:Observation.subject={value}", "{b}", "{nobody}"),
    ("Observation?has-member:Observation.patient={value}", "{b}", "{nobody}"),
    ("Encounter?part-of.subject={value}", "{b}", "{nobody}"),
    ("Encounter?part-of.date={value}", "ge2026-01-01", "ge2031-01-01"),
]
# Chains this server refuses (r4/search.py: one level of chaining, no _has): refused before anything is matched.
UNSUPPORTED_CHAINS = [
    ("Observation?derived-from:Observation.subject:Patient.family={value}", "Zyxwvut", "Wrongguess"),
    ("Encounter?part-of.subject:Patient.birthdate={value}", "1987-04-12", "1901-01-01"),
    ("Patient?_has:Observation:subject:code={value}", SMOKING, NOT_SMOKING),
]


def _found(client: FlaskClient, query: str) -> tuple[int, int, set[str], int]:
    """Status, total, what matched, and the count of ``_summary=count``."""
    response = client.get(f"/fhir/{query}&_total=accurate")
    counted = client.get(f"/fhir/{query}&_summary=count")
    assert response.status_code == counted.status_code == 200, response.get_json()
    found = response.get_json()
    return response.status_code, found["total"], references(found), counted.get_json()["total"]


@pytest.mark.parametrize(("query", "value", "guess"), CHAINS, ids=[c[0].split("=")[0] for c in CHAINS])
def test_a_chain_through_a_visible_resource_cannot_test_a_hidden_patients_values(
    client: FlaskClient, program: dict[str, Any], through_b: dict[str, str], query: str, value: str, guess: str
) -> None:
    names = {"b": program["b"]["patient"], "nobody": f"Patient/{never_existed()}"}
    value, guess = value.format(**names), guess.format(**names)
    # The chain does match B's value when nothing is hidden: the program's own client finds A's record by it.
    assert total(client, query.format(value=value)) == 1
    partner = program["partner"]
    assert _found(partner, query.format(value=value)) == (200, 0, set(), 0)
    assert _found(partner, query.format(value=guess)) == (200, 0, set(), 0)


@pytest.mark.parametrize(
    ("query", "value", "guess"), UNSUPPORTED_CHAINS, ids=[c[0].split("=")[0] for c in UNSUPPORTED_CHAINS]
)
def test_a_chain_this_server_does_not_support_is_refused_the_same_whatever_the_value(
    program: dict[str, Any], through_b: dict[str, str], query: str, value: str, guess: str
) -> None:
    partner = program["partner"]
    right, wrong = partner.get(f"/fhir/{query.format(value=value)}"), partner.get(f"/fhir/{query.format(value=guess)}")
    assert right.status_code == 400, right.get_json()
    assert issue(right)["code"] == "not-supported"
    assert issue(right)["expression"] == [query.split("?", 1)[1].split("=", 1)[0]]
    assert answer(right, value) == answer(wrong, guess)


# -- 5. _include:iterate never walks through hidden resources -------------------------------------------------


INCLUDES = [
    # (the includes, what they reach from A's Observation when nothing is hidden: B's and what only B's reaches)
    ("_include=Observation:derived-from&_include:iterate=Observation:performer", {"of_b", "practitioner"}),
    ("_include:iterate=Observation:has-member&_include:iterate=Observation:performer", {"of_b", "practitioner"}),
    ("_include=Observation:derived-from&_revinclude:iterate=Provenance:target", {"of_b", "provenance"}),
    (
        "_include:iterate=Observation:has-member&_revinclude:iterate=Provenance:target"
        "&_include:iterate=Observation:performer",
        {"of_b", "provenance", "practitioner"},
    ),
]


@pytest.mark.parametrize(("includes", "beyond"), INCLUDES, ids=["performer", "member", "provenance", "all"])
def test_include_iterate_never_walks_through_a_hidden_resource(
    client: FlaskClient, program: dict[str, Any], through_b: dict[str, str], includes: str, beyond: set[str]
) -> None:
    query = f"/fhir/Observation?_id={through_b['of_a'].split('/')[1]}&{includes}"
    assert references(client.get(query).get_json()) == {through_b["of_a"], *(through_b[k] for k in beyond)}
    response = program["partner"].get(query)
    assert response.status_code == 200, response.get_json()
    assert references(response.get_json()) == {through_b["of_a"]}


# -- 6. existence oracles: a hidden id answers as one that never existed --------------------------------------


@pytest.fixture
def observation_of_b(client: FlaskClient, program: dict[str, Any]) -> str:
    """An Observation of B at version 2."""
    res_id = create(client, "Observation", observation(program["b"]["patient"]))
    again = {**observation(program["b"]["patient"]), "id": res_id, "status": "amended"}
    assert send(client, "PUT", f"/fhir/Observation/{res_id}", again).status_code == 200
    return res_id


def _delete_if_match(client: FlaskClient, kind: str, res_id: str, version: str) -> Any:
    entry = {"request": {"method": "DELETE", "url": f"Observation/{res_id}", "ifMatch": f'W/"{version}"'}}
    return send(client, "POST", "/fhir", transaction(kind, entry))


@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize("kind", ["transaction", "batch"])
def test_a_delete_with_if_match_on_a_hidden_id_answers_as_on_an_id_that_never_existed(
    attacker: FlaskClient, client: FlaskClient, observation_of_b: str, kind: str, version: str
) -> None:
    nobody = never_existed()
    hidden = _delete_if_match(attacker, kind, observation_of_b, version)
    unknown = _delete_if_match(attacker, kind, nobody, version)
    assert answer(hidden, observation_of_b) == answer(unknown, nobody)
    if version == "1":
        assert 'W/\\"2\\"' not in hidden.get_data(as_text=True) and "version 2" not in hidden.get_data(as_text=True)
    stored = read(client, f"Observation/{observation_of_b}")
    assert stored["meta"]["versionId"] == "2" and stored["status"] == "amended"


def _conditional_update(client: FlaskClient, how: str, body: dict[str, Any]) -> Any:
    condition = f"Observation?identifier={FORGED}|nomatch"
    if how == "direct":
        return send(client, "PUT", f"/fhir/{condition}", body)
    entry = {"fullUrl": urn(), "resource": body, "request": {"method": "PUT", "url": condition}}
    return send(client, "POST", "/fhir", transaction("transaction", entry))


@pytest.mark.parametrize("how", ["direct", "transaction"])
def test_a_conditional_update_that_matches_nothing_with_a_hidden_id_answers_as_with_an_id_that_never_existed(
    attacker: FlaskClient, client: FlaskClient, program: dict[str, Any], observation_of_b: str, how: str
) -> None:
    """A restricted client creates only with POST: a conditional update that matches nothing is a 404 like a PUT to
    an unknown id, whatever the id its body names."""
    a, nobody = program["a"]["patient"], never_existed()
    hidden = _conditional_update(attacker, how, {**observation(a), "id": observation_of_b})
    unknown = _conditional_update(attacker, how, {**observation(a), "id": nobody})
    assert answer(hidden, observation_of_b) == answer(unknown, nobody)
    assert hidden.status_code == 404, hidden.get_json()
    assert issue(hidden)["code"] == "not-found"
    assert read(client, f"Observation/{observation_of_b}")["meta"]["versionId"] == "2"
    assert client.get(f"/fhir/Observation/{nobody}").status_code == 404


def test_a_partners_conditional_create_never_matches_a_hidden_patient(
    attacker: FlaskClient, client: FlaskClient, program: dict[str, Any]
) -> None:
    b = program["b"]["patient"]
    before = read(client, b)

    def create_if_none(mrn: str) -> Any:
        patient = {"resourceType": "Patient", "identifier": [{"system": MRN, "value": mrn}], "name": [{"family": "X"}]}
        return send(attacker, "POST", "/fhir/Patient", patient, **{"If-None-Exist": f"identifier={MRN}|{mrn}"})

    hidden, unknown = create_if_none("MRN-B-2"), create_if_none("MRN-NOBODY-9")
    assert hidden.status_code == unknown.status_code == 201, hidden.get_json()
    assert hidden.get_json()["id"] != b.split("/")[1]
    assert sorted(hidden.headers.keys()) == sorted(unknown.headers.keys())
    assert attacker.get(f"/fhir/{b}").status_code == 404
    assert read(client, b) == before


@pytest.mark.parametrize("content_type", ["application/json", "application/json-patch+json"])
def test_a_partners_conditional_patch_never_reaches_a_hidden_match(
    attacker: FlaskClient, client: FlaskClient, program: dict[str, Any], content_type: str
) -> None:
    """A conditional patch matches only what the client may see: a hidden match answers as no match (404)."""
    b = program["b"]["patient"]
    before = read(client, b)
    body = (
        [{"op": "add", "path": "/gender", "value": "unknown"}]
        if "json-patch" in content_type
        else {"gender": "unknown"}
    )

    def patch_where(mrn: str) -> Any:
        return attacker.open(
            f"/fhir/Patient?identifier={quote(MRN + '|' + mrn)}",
            method="PATCH",
            data=orjson.dumps(body),
            content_type=content_type,
        )

    hidden, unknown = patch_where("MRN-B-2"), patch_where("MRN-NOBODY-9")
    assert hidden.status_code == unknown.status_code == 404, hidden.get_json()
    assert answer(hidden, "MRN-B-2") == answer(unknown, "MRN-NOBODY-9")
    assert read(client, b) == before


def test_a_partners_compartment_search_of_a_hidden_patient_answers_as_for_one_that_never_existed(
    attacker: FlaskClient, client: FlaskClient, program: dict[str, Any]
) -> None:
    b, a, nobody = program["b"]["patient"], program["a"]["patient"], never_existed()
    assert total(client, f"{b}/Encounter") > 0  # the program sees B's encounters
    hidden = attacker.get(f"/fhir/{b}/Encounter")
    unknown = attacker.get(f"/fhir/Patient/{nobody}/Encounter")
    assert hidden.status_code == unknown.status_code == 404, hidden.get_json()
    assert answer(hidden, b.split("/")[1]) == answer(unknown, nobody)
    assert total(attacker, f"{a}/Encounter") == total(attacker, f"Encounter?subject={a}") > 0


# -- 7. labels on everything disclosed ------------------------------------------------------------------------


@pytest.fixture
def unlabelled_of_a(client: FlaskClient, program: dict[str, Any]) -> str:
    """An Observation of A that the program stored without any meta.security."""
    res_id = create(client, "Observation", observation(program["a"]["patient"], code={"text": "unlabelled"}))
    assert "security" not in read(client, f"Observation/{res_id}").get("meta", {})
    return res_id


def _disclosed(partner: FlaskClient, path: str, res_id: str) -> dict[str, Any]:
    """The Observation ``res_id`` as ``path`` (a GET, or "batch" for a batch read of it) discloses it."""
    if path == "batch":
        bundle = transaction("batch", {"request": {"method": "GET", "url": f"Observation/{res_id}"}})
        response = send(partner, "POST", "/fhir", bundle)
    else:
        response = partner.get(path)
    assert response.status_code == 200, response.get_json()
    body: dict[str, Any] = response.get_json()
    if body["resourceType"] == "Observation":
        return body
    resources = [e["resource"] for e in body["entry"] if "resource" in e]
    found: list[dict[str, Any]] = [r for r in resources if r["resourceType"] == "Observation" and r["id"] == res_id]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize(
    "path",
    [
        "/fhir/Observation/{id}",
        "/fhir/Observation/{id}/_history/1",
        "/fhir/Observation?_id={id}",
        "/fhir/Patient?_id={a}&_revinclude=Observation:subject",
        "/fhir/Observation/{id}/_history",
        "/fhir/Observation/_history?_count=1000",
        "batch",
    ],
    ids=["read", "vread", "search", "revinclude", "instance-history", "type-history", "batch"],
)
def test_what_a_partner_receives_carries_the_part2_labels_and_the_mark_even_if_stored_without(
    program: dict[str, Any], unlabelled_of_a: str, path: str
) -> None:
    path = path.format(id=unlabelled_of_a, a=program["a"]["patient"].split("/")[1])
    labels = security(_disclosed(program["partner"], path, unlabelled_of_a))
    assert DISCLOSED_LABELS <= labels
    assert MARK in labels


def test_a_partners_export_carries_the_part2_labels_and_the_mark_even_if_stored_without(
    app: Flask, program: dict[str, Any], unlabelled_of_a: str
) -> None:
    partner = program["partner"]
    exporter = app.extensions["iop_fhir.exports"]
    exporter.background = False
    kick_off = partner.get("/fhir/Patient/$export?_type=Observation", headers={"Prefer": "respond-async"})
    assert kick_off.status_code == 202, kick_off.get_json()
    exporter.run_due()
    status = partner.get(kick_off.headers["Content-Location"].removeprefix("http://testserver"))
    assert status.status_code == 200, status.get_data(as_text=True)
    exported = [
        orjson.loads(line)
        for item in status.get_json()["output"]
        for line in partner.get(item["url"].removeprefix("http://testserver")).data.splitlines()
    ]
    [found] = [r for r in exported if r["id"] == unlabelled_of_a]
    assert DISCLOSED_LABELS <= security(found)
    assert MARK in security(found)


# -- 8. a hidden resource is exactly like one that never existed on every read path -------------------------


def _hidden_records(client: FlaskClient, program: dict[str, Any], res_type: str) -> tuple[str, str]:
    """B's Patient or session Encounter: its id and the value of its first identifier."""
    reference = program["b"]["patient"] if res_type == "Patient" else session_of(client, program["b"]["patient"])
    resource = read(client, reference)
    return resource["id"], f"{resource['identifier'][0]['system']}|{resource['identifier'][0]['value']}"


READS = {
    "read": "GET {type}/{id}",
    "vread": "GET {type}/{id}/_history/1",
    "history": "GET {type}/{id}/_history",
    "search-id": "GET {type}?_id={id}",
    "search-identifier": "GET {type}?identifier={identifier}&_total=accurate",
    "summary-count": "GET {type}?_id={id}&_summary=count",
    "total-accurate": "GET {type}?_id={id}&_total=accurate",
    "batch-read": "batch {type}/{id}",
    "batch-search": "batch {type}?identifier={identifier}&_total=accurate",
    "transaction-read": "transaction {type}/{id}",
    "transaction-search": "transaction {type}?_id={id}&_total=accurate",
}


def _read_path(client: FlaskClient, name: str, res_type: str, res_id: str, identifier: str) -> Any:
    how, template = READS[name].split(" ", 1)
    url = template.format(type=res_type, id=res_id, identifier=quote(identifier, safe=":/"))
    if how == "GET":
        return client.get(f"/fhir/{url}")
    return send(client, "POST", "/fhir", transaction(how, {"request": {"method": "GET", "url": url}}))


def _totals(body: Any) -> list[int]:
    """Every total in a response (a searchset's, or those of the searchsets of its entries)."""
    if not isinstance(body, dict):
        return []
    found = [body["total"]] if "total" in body else []
    for entry in body.get("entry", []):
        found += _totals(entry.get("resource"))
    return found


@pytest.mark.parametrize("name", sorted(READS))
@pytest.mark.parametrize("res_type", ["Patient", "Encounter"])
def test_a_hidden_patients_record_is_exactly_like_one_that_never_existed(
    client: FlaskClient, program: dict[str, Any], res_type: str, name: str
) -> None:
    partner = program["partner"]
    hidden_id, hidden_identifier = _hidden_records(client, program, res_type)
    nobody, nobodys_identifier = never_existed(), f"{hidden_identifier.split('|')[0]}|{never_existed()}"
    hidden = _read_path(partner, name, res_type, hidden_id, hidden_identifier)
    unknown = _read_path(partner, name, res_type, nobody, nobodys_identifier)
    hidden_value, unknown_value = hidden_identifier.split("|")[1], nobodys_identifier.split("|")[1]
    assert answer(hidden, hidden_id, hidden_value) == answer(unknown, nobody, unknown_value)
    assert hidden.status_code in (200, 404)
    if hidden.status_code == 404:
        assert issue(hidden)["code"] == "not-found"
    assert all(found == 0 for found in _totals(hidden.get_json()))
    # The probe is not empty because there is nothing to find: the program's own client finds the record.
    assert _read_path(client, "search-identifier", res_type, hidden_id, hidden_identifier).get_json()["total"] == 1


# -- a patient named by no local id ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "subject",
    [
        {"identifier": {"system": MRN, "value": "B-0001"}},
        {"type": "Patient", "identifier": {"system": MRN, "value": "B-0001"}, "display": "B"},
        {"reference": "https://elsewhere.example/fhir-like/patients/B-0001"},
    ],
    ids=["identifier", "typed-identifier", "foreign-url"],
)
def test_an_unlabelled_resource_about_a_patient_named_only_by_identifier_is_never_shown_to_a_partner(
    client: FlaskClient, attacker: FlaskClient, program: dict[str, Any], subject: dict[str, Any]
) -> None:
    res_id = create(client, "Observation", {**observation("Patient/x"), "subject": subject})
    assert security(read(client, f"Observation/{res_id}")) == set()  # stored with no label
    assert attacker.get(f"/fhir/Observation/{res_id}").status_code == 404
    assert attacker.get(f"/fhir/Observation/{res_id}/_history/1").status_code == 404
    for query in (
        f"Observation?_id={res_id}&_total=accurate",
        "Observation?subject:missing=false&code:text=craving&_count=100",
        f"Observation/{res_id}/_history",
        "Observation/_history?_count=100",
        "_history?_count=100",
    ):
        bundle = attacker.get(f"/fhir/{query}").get_json()
        assert f"Observation/{res_id}" not in references(bundle), query
        assert all(e["fullUrl"].rsplit("/", 1)[-1] != res_id for e in bundle.get("entry", [])), query
    assert attacker.get(f"/fhir/Observation?_id={res_id}&_total=accurate").get_json()["total"] == 0
    assert total(client, f"Observation?_id={res_id}") == 1  # the program's client sees it


@pytest.mark.parametrize("where", ["extension", "contained"])
def test_a_consented_patients_resource_that_names_a_hidden_patient_where_no_parameter_reads_is_hidden(
    client: FlaskClient, attacker: FlaskClient, program: dict[str, Any], where: str
) -> None:
    a, b = program["a"]["patient"], program["b"]["patient"]
    naming_b: dict[str, Any] = (
        {"extension": [{"url": "https://example.org/fhir/witness", "valueReference": {"reference": b}}]}
        if where == "extension"
        else {"contained": [observation(b, id="inner")], "hasMember": [{"reference": "#inner"}]}
    )
    res_id = create(client, "Observation", observation(a, **naming_b))
    plain = create(client, "Observation", observation(a))
    assert attacker.get(f"/fhir/Observation/{plain}").status_code == 200  # A's own resources show
    assert attacker.get(f"/fhir/Observation/{res_id}").status_code == 404
    bundle = attacker.get(f"/fhir/Observation?subject={a}&_count=100").get_json()
    assert f"Observation/{res_id}" not in references(bundle)
    assert b.split("/")[1] not in orjson.dumps(bundle).decode()


def test_every_stage_a_partner_reaches_leaves_out_a_resource_that_names_a_hidden_patient_in_an_extension(
    client: FlaskClient, attacker: FlaskClient, program: dict[str, Any]
) -> None:
    a, b = program["a"]["patient"], program["b"]["patient"]
    witness = {"extension": [{"url": "https://example.org/fhir/witness", "valueReference": {"reference": b}}]}
    res_id = create(client, "Observation", observation(a, **witness))
    hidden = f"Observation/{res_id}"
    a_id = a.split("/")[1]
    for query in (
        f"Patient?_id={a_id}&_revinclude=Observation:subject&_count=100",
        f"Patient/{a_id}/Observation?_count=100",
        f"Observation?subject={a}&_count=100&_sort=-_lastUpdated",
        "Observation/_history?_count=100",
        "_history?_count=100",
    ):
        response = attacker.get(f"/fhir/{query}")
        assert response.status_code == 200, (query, response.get_json())
        assert hidden not in references(response.get_json()), query
    assert total(attacker, f"Observation?subject={a}") == total(client, f"Observation?subject={a}") - 1
    batch = transaction(
        "batch",
        {"request": {"method": "GET", "url": hidden}},
        {"request": {"method": "GET", "url": f"Observation?_id={res_id}"}},
    )
    answer = send(attacker, "POST", "/fhir", batch).get_json()
    assert answer["entry"][0]["response"]["status"].startswith("404"), answer
    assert references(answer["entry"][1]["resource"]) == set(), answer


def test_a_partners_revinclude_is_bounded_on_what_it_may_see_and_its_warning_tells_nothing_of_hidden_resources(
    client: FlaskClient, attacker: FlaskClient, program: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = program["a"]["patient"], program["b"]["patient"]
    witness = {"extension": [{"url": "https://example.org/fhir/witness", "valueReference": {"reference": b}}]}
    hidden = {f"Observation/{create(client, 'Observation', observation(a, **witness))}" for _ in range(3)}
    for _ in range(3):
        create(client, "Observation", observation(a))
    query = f"/fhir/Patient?_id={a.split('/')[1]}&_revinclude=Observation:subject"

    def included(who: FlaskClient, via: str = "GET") -> tuple[list[str], list[Any]]:
        if via == "GET":
            bundle = who.get(query).get_json()
        else:  # the same search as an entry of a batch
            answer = send(who, "POST", "/fhir", transaction("batch", {"request": {"method": "GET", "url": query[6:]}}))
            [entry] = answer.get_json()["entry"]
            assert entry["response"]["status"].startswith("200"), entry
            bundle = entry["resource"]
        entries = bundle["entry"]
        found = [f"Observation/{e['resource']['id']}" for e in entries if e["search"]["mode"] == "include"]
        outcomes = [i for e in entries if e["search"]["mode"] == "outcome" for i in e["resource"]["issue"]]
        return found, outcomes

    everything, _ = included(client)
    visible, _ = included(attacker)
    assert hidden <= set(everything) and not hidden & set(visible)
    assert len(visible) >= 3

    monkeypatch.setattr(search_rules, "MAX_INCLUDED", len(visible))
    for via in ("GET", "batch"):
        found, outcomes = included(attacker, via)
        assert sorted(found) == sorted(visible) and outcomes == [], via  # nothing said of the hidden ones
    found, outcomes = included(client)  # the program's client sees more than fit
    assert sorted(found) == sorted(everything)[: len(visible)]
    assert [(i["code"], i["expression"]) for i in outcomes] == [("too-costly", ["_revinclude"])]

    monkeypatch.setattr(search_rules, "MAX_INCLUDED", len(visible) - 1)
    for via in ("GET", "batch"):
        found, outcomes = included(attacker, via)
        assert sorted(found) == sorted(visible)[:-1], via
        assert [(i["code"], i["expression"]) for i in outcomes] == [("too-costly", ["_revinclude"])], via


def test_a_partners_include_is_bounded_on_what_it_may_see_and_its_warning_tells_nothing_of_hidden_targets(
    client: FlaskClient, attacker: FlaskClient, program: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = program["a"]["patient"], program["b"]["patient"]
    of_b = [f"Observation/{create(client, 'Observation', observation(b))}" for _ in range(3)]
    of_a = [f"Observation/{create(client, 'Observation', observation(a))}" for _ in range(2)]
    panel = create(client, "Observation", observation(a, hasMember=[{"reference": r} for r in of_b + of_a]))
    query = f"/fhir/Observation?_id={panel}&_include=Observation:has-member"

    def included(who: FlaskClient) -> tuple[set[str], list[Any]]:
        entries = who.get(query).get_json()["entry"]
        found = {f"Observation/{e['resource']['id']}" for e in entries if e["search"]["mode"] == "include"}
        return found, [i for e in entries if e["search"]["mode"] == "outcome" for i in e["resource"]["issue"]]

    monkeypatch.setattr(search_rules, "MAX_INCLUDED", len(of_a))
    assert included(attacker) == (set(of_a), [])  # B's Observations neither shown nor counted against the bound
    found, outcomes = included(client)
    assert len(found) == len(of_a) and [(i["code"], i["expression"]) for i in outcomes] == [
        ("too-costly", ["_include"])
    ]
