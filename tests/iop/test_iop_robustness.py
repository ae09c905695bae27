"""Robustness of the /iop API: whatever a client sends, the answer is never a 500, every error is an
OperationOutcome naming the field or parameter at fault, and a refused request changes nothing.

The first half fuzzes every write of /iop with hypothesis (contract payloads mutated, arbitrary JSON, decision
bodies, ids and query parameters) and walks every field of every contract payload (deleted, null, empty, of another
type); the second half pins each bug this found, with the rule it broke. SQLite only: the rules do not depend on the
database.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.mutations import mutate, paths

CONTRACT = Path(__file__).resolve().parents[2].parent / "shared" / "contract"
JSON = "application/json"
FHIR = "application/fhir+json"
KINDS = ("partner", "enrollment", "assessment", "treatment-plan", "session", "consent", "discharge")
PLURAL = {kind: f"{kind}s" for kind in KINDS}
ACTIONS = ("accept", "decline", "no-show", "admit")
ADMISSION = {"program": "adult-sud", "level_of_care": "2.1", "admission_date": "2026-02-09"}
# Errors about the body as a whole (not JSON, not an object, empty) name no field, by design (tests/iop/test_views);
# nor does werkzeug's 404 for a URL that matches no route (an id holding %2F).
WHOLE_BODY = ("the body ", "the request body ", "The requested URL was not found on the server.")

# Modest on purpose (IOP_FHIR_FUZZ_EXAMPLES=2000 for a long hunt); CI (CI=true) replays the same examples.
FUZZ = settings(
    max_examples=int(os.environ.get("IOP_FHIR_FUZZ_EXAMPLES", "60")),
    deadline=None,
    database=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def contract(kind: str, enrollment_id: str = "e") -> dict[str, Any]:
    text = (CONTRACT / f"{kind}.json").read_text(encoding="utf-8").replace("{{enrollment_id}}", enrollment_id)
    payload: dict[str, Any] = json.loads(text)
    return payload


# -- the property ---------------------------------------------------------------------------------------------


def problems(response: Any) -> list[str]:
    """What is wrong with an answer: a 5xx; an error that is not an OperationOutcome; an error about a field or a
    parameter whose issues name none (405 is about the method, and whole-body errors name no field)."""
    status = response.status_code
    if status >= 500:
        return [f"{status}: {response.get_data()[:600]!r}"]
    if status < 400:
        return []
    try:
        body = orjson.loads(response.get_data())
    except orjson.JSONDecodeError:
        return [f"{status} that is not JSON: {response.get_data()[:200]!r}"]
    if body.get("resourceType") != "OperationOutcome" or not body.get("issue"):
        return [f"{status} that is not an OperationOutcome: {body}"]
    issues = body["issue"]
    if not all(i.get("severity") and i.get("code") and i.get("diagnostics") for i in issues):
        return [f"{status} with an issue lacking severity, code or diagnostics: {body}"]
    if status == 405 or any(i.get("expression") for i in issues):
        return []
    if all(str(i["diagnostics"]).startswith(WHOLE_BODY) for i in issues):
        return []
    return [f"{status} naming no field or parameter: {json.dumps(body)[:600]}"]


def state(client: FlaskClient) -> tuple[int, ...]:
    """Every FHIR version ever written, and the number of records of each kind, referrals and deliveries."""
    counts = [client.get("/fhir/_history?_count=0").get_json()["total"]]
    for path in [*(f"/iop/{PLURAL[kind]}" for kind in KINDS), "/iop/referrals", "/iop/deliveries"]:
        counts.append(client.get(f"{path}?count=0").get_json()["total"])
    return tuple(counts)


def send(client: FlaskClient, method: str, path: str, body: Any = None, *, raw: bool = False) -> list[str]:
    """The problems of one request, including a refusal (4xx) that changed something."""
    before = state(client) if method != "GET" else None
    data = body if raw else (None if body is None else dumps(body))
    response = client.open(path, method=method, data=data, content_type=JSON)
    found = problems(response)
    if before is not None and response.status_code >= 400 and state(client) != before:
        found.append(f"{response.status_code} refusal changed the state")
    return [f"{method} {path[:100]} {str(body)[:160]!r}: {p}" for p in found]


def dumps(value: Any) -> bytes:
    """JSON as any client may write it: big integers, NaN, and deep nesting."""
    return json.dumps(value, allow_nan=True).encode()


def created(client: FlaskClient, method: str, path: str, body: Any) -> dict[str, Any]:
    response = client.open(path, method=method, data=orjson.dumps(body), content_type=JSON)
    assert response.status_code in (200, 201), response.get_json()
    answer: dict[str, Any] = response.get_json()
    return answer


@pytest.fixture
def program(sqlite_client: FlaskClient) -> dict[str, str]:
    """One record of each kind but the discharge (a POST of it is the first to be accepted), and a referral."""
    client = sqlite_client
    ids = {"partner": created(client, "POST", "/iop/partners", contract("partner"))["id"]}
    enrollment_id = created(client, "POST", "/iop/enrollments", contract("enrollment"))["id"]
    ids["enrollment"] = enrollment_id
    for kind in ("treatment-plan", "assessment", "session", "consent"):
        ids[kind] = created(client, "POST", f"/iop/{PLURAL[kind]}", contract(kind, enrollment_id))["id"]
    bundle = json.loads((CONTRACT / "inbound-referral-bundle.json").read_text(encoding="utf-8"))
    response = client.post("/fhir", data=orjson.dumps(bundle), content_type=FHIR)
    assert response.status_code == 200
    locations = [e["response"]["location"] for e in response.get_json()["entry"]]
    ids["referral"] = next(loc.split("/")[1] for loc in locations if loc.startswith("Task/"))
    return ids


# -- strategies -----------------------------------------------------------------------------------------------

# fmt: off
ODD_STRINGS: list[Any] = [
    "", " ", "\x00", "a\x00b", "\x1f", "\u200b", "\u202e", "\ufeff", "é", "𝔘", "\U0010ffff", "\ud7ff", "null", "NaN",
    "2026-02-30", "9999-99-99", "0000-00-00", "2026-01-07T18:00:00", "2026-01-07T25:00:00Z", "2026-13-01T00:00:00Z",
    "2026-01-07T18:00:00+99:99", "1e400", "-0", "٣", "a" * 65, "x" * 70_000, "  group-therapy", "GROUP-THERAPY",
    "passaic-valley-recovery", "1234567893", "1234567890", "urn:oid:", "http://", "https://a b", "wk", "mo",
]
NUMBER_VALUES: list[Any] = [
    0, -1, 1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, 2**70, 10**400, 1e308, 5e-324, -0.0, 0.5,
]
# fmt: on
TEXT = st.one_of(st.text(max_size=10), st.sampled_from(ODD_STRINGS))
NUMBERS = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=False),
    st.sampled_from(NUMBER_VALUES),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
ANY_JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=8,
)


def _deep(depth: int) -> Any:
    value: Any = "v"
    for i in range(depth):
        value = [value] if i % 2 else {"a": value}
    return value


MUTANTS = st.one_of(
    ANY_JSON,
    st.sampled_from([None, [], {}, "", [None], [{}], {"": ""}, [[]], True, False]),
    st.integers(min_value=1, max_value=200).map(_deep),
)


@st.composite
def mutated(draw: st.DrawFn, payload: dict[str, Any]) -> Any:
    """The payload with one to three of its fields replaced, deleted, wrapped in an array or copied under an
    unknown name."""
    mutant: Any = copy.deepcopy(payload)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        candidates = list(paths(mutant))
        path = draw(st.sampled_from(candidates[1:] or candidates))
        how = draw(st.sampled_from(["replace", "replace", "delete", "wrap", "unknown"]))
        mutant = mutate(mutant, path, copy.deepcopy(draw(MUTANTS)), how)
        if not isinstance(mutant, dict):
            break
    return mutant


IDS = st.one_of(
    st.text(min_size=1, max_size=20).map(lambda t: quote(t, safe="")),
    st.sampled_from(["nope", "a" * 64, "a" * 65, "a" * 5000, "a%00b", "%C3%A9", "..", "a.b", "-", "%2F", "%FF"]),
)


# -- fuzzing --------------------------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_mutated_record_payloads_are_never_a_5xx_and_refusals_name_the_field_and_change_nothing(
    sqlite_client: FlaskClient, program: dict[str, str], data: st.DataObject
) -> None:
    kind = data.draw(st.sampled_from(KINDS))
    payload = contract(kind, program["enrollment"])
    if data.draw(st.booleans()) and kind in program:
        if kind == "partner":
            payload["id"] = program["partner"]
        method, path = "PUT", f"/iop/{PLURAL[kind]}/{program[kind]}"
    else:
        method, path = "POST", f"/iop/{PLURAL[kind]}"
    assert send(sqlite_client, method, path, data.draw(mutated(payload))) == []


@FUZZ
@given(data=st.data())
def test_arbitrary_json_bodies_are_never_a_5xx(
    sqlite_client: FlaskClient, program: dict[str, str], data: st.DataObject
) -> None:
    kind = data.draw(st.sampled_from(KINDS))
    paths = [("POST", f"/iop/{PLURAL[kind]}")]
    if kind in program:
        paths.append(("PUT", f"/iop/{PLURAL[kind]}/{program[kind]}"))
        if kind != "partner":
            paths.append(("POST", f"/iop/{PLURAL[kind]}/{program[kind]}/retract"))
    paths += [("POST", f"/iop/referrals/{program['referral']}/{action}") for action in ACTIONS]
    method, path = data.draw(st.sampled_from(paths))
    body = data.draw(st.one_of(ANY_JSON, st.dictionaries(TEXT, ANY_JSON, max_size=4)))
    assert send(sqlite_client, method, path, body) == []


@FUZZ
@given(data=st.data())
def test_referral_decisions_are_never_a_5xx(
    sqlite_client: FlaskClient, program: dict[str, str], data: st.DataObject
) -> None:
    action = data.draw(st.sampled_from(ACTIONS))
    valid: dict[str, Any] = {
        "accept": {"planned_admission": "2026-02-09"},
        "decline": {"reason": "No openings"},
        "no-show": {},
        "admit": {"enrollment": {**ADMISSION, "candidacy": {"stable_housing": True}}},
    }[action]
    body = data.draw(mutated(valid)) if valid else data.draw(ANY_JSON)
    referral = data.draw(st.one_of(st.just(program["referral"]), IDS))
    if action in ("admit", "no-show") and data.draw(st.booleans()):
        sqlite_client.post(f"/iop/referrals/{program['referral']}/accept", json={"planned_admission": "2026-02-09"})
    assert send(sqlite_client, "POST", f"/iop/referrals/{referral}/{action}", body) == []


@FUZZ
@given(data=st.data())
def test_ids_in_urls_are_never_a_5xx(sqlite_client: FlaskClient, program: dict[str, str], data: st.DataObject) -> None:
    record_id = data.draw(IDS)
    kind = data.draw(st.sampled_from(KINDS))
    method, path, body = data.draw(
        st.sampled_from(
            [
                ("GET", f"/iop/{PLURAL[kind]}/{record_id}", None),
                ("PUT", f"/iop/{PLURAL[kind]}/{record_id}", contract(kind, program["enrollment"])),
                ("POST", f"/iop/{PLURAL[kind]}/{record_id}/retract", {"reason": "entered in error"}),
                ("GET", f"/iop/referrals/{record_id}", None),
                ("POST", f"/iop/referrals/{record_id}/decline", {"reason": "No openings"}),
                ("GET", f"/iop/deliveries/{record_id}", None),
                ("POST", f"/iop/deliveries/{record_id}/retry", None),
            ]
        )
    )
    assert send(sqlite_client, method, path, body) == []


QUERY_NAMES = ["enrollment", "offset", "count", "status", "partner", "record", "_count", "x", "", "%FF", "count%00"]
QUERY_VALUES = st.one_of(
    TEXT.map(lambda t: quote(t, safe="")),
    st.sampled_from(["-1", "0", "1", "1000", "1001", "99999999999999999999", "9" * 400, "1e3", "1.5", "%FF", "%00"]),
    st.sampled_from(["requested", "accepted", "dead", "blocked", "discharge/d1", "discharge/" + "a" * 70]),
)


@FUZZ
@given(data=st.data())
def test_list_queries_are_never_a_5xx(sqlite_client: FlaskClient, data: st.DataObject) -> None:
    path = data.draw(
        st.sampled_from([*(f"/iop/{PLURAL[kind]}" for kind in KINDS), "/iop/referrals", "/iop/deliveries"])
    )
    pairs = data.draw(st.lists(st.tuples(st.sampled_from(QUERY_NAMES), QUERY_VALUES), max_size=3))
    query = "&".join(f"{name}={value}" for name, value in pairs)
    assert send(sqlite_client, "GET", f"{path}?{query}") == []


# -- every field of every contract payload --------------------------------------------------------------------


def _wrong_type(value: Any) -> Any:
    if isinstance(value, str):
        return 5
    if isinstance(value, bool | int | float):
        return str(value)
    if isinstance(value, list):
        return {}
    return []


RAW_BODIES = [b"null", b"[]", b"5", b'"x"', b"{", b"NaN", b"1e999", b"\xff\xfe", b" ", b'{"\\ud800":1}']
RAW_BODIES += [("[" * 100_000 + "]" * 100_000).encode(), ('{"a":' * 600 + "1" + "}" * 600).encode()]


@pytest.mark.parametrize("kind", KINDS)
def test_every_field_deleted_null_empty_or_of_another_type_is_refused_naming_it_or_accepted(
    sqlite_client: FlaskClient, program: dict[str, str], kind: str
) -> None:
    payload = contract(kind, program["enrollment"])
    if kind == "partner":
        payload["id"] = program["partner"]
    target = ("PUT", f"/iop/{PLURAL[kind]}/{program[kind]}") if kind in program else ("POST", f"/iop/{PLURAL[kind]}")
    found: list[str] = []
    for path in list(paths(payload))[1:]:
        current: Any = payload
        for step in path:
            current = current[step]
        for how, value in [("delete", None), ("set", None), ("set", ""), ("set", _wrong_type(current))]:
            found += send(sqlite_client, *target, mutate(copy.deepcopy(payload), path, value, how))
    for raw in RAW_BODIES:
        found += send(sqlite_client, *target, raw, raw=True)
    assert found == []


# -- the bugs found, one rule each ----------------------------------------------------------------------------


def outcome(response: Any) -> list[tuple[str, str | None]]:
    return [(i["code"], (i.get("expression") or [None])[0]) for i in response.get_json()["issue"]]


@pytest.mark.parametrize(
    ("kind", "path", "expression"),
    [
        ("partner", ("name",), "name"),
        ("enrollment", ("patient", "name", "family"), "patient.name.family"),
        ("enrollment", ("support_contacts", 0, "name"), "support_contacts[0].name"),
        ("assessment", ("notes",), "notes"),
        ("treatment-plan", ("goals", 0, "description"), "goals[0].description"),
        ("session", ("progress_note",), "progress_note"),
        ("discharge", ("summary",), "summary"),
    ],
)
@pytest.mark.parametrize("character", ["\x00", "\x08", "\x1f"])
def test_a_control_character_in_a_text_field_is_a_400_naming_the_field_and_changes_nothing(
    sqlite_client: FlaskClient,
    program: dict[str, str],
    kind: str,
    path: tuple[Any, ...],
    expression: str,
    character: str,
) -> None:
    payload = contract(kind, program["enrollment"])
    if kind == "partner":
        payload["id"] = "another-partner"
    mutate(payload, path, f"a{character}b", "set")
    before = state(sqlite_client)
    response = sqlite_client.post(f"/iop/{PLURAL[kind]}", json=payload)
    assert response.status_code == 400
    assert outcome(response) == [("value", expression)]
    assert f"found U+{ord(character):04X} at position 1" in response.get_json()["issue"][0]["diagnostics"]
    assert state(sqlite_client) == before


def test_tab_cr_and_lf_in_a_text_field_are_accepted(sqlite_client: FlaskClient, program: dict[str, str]) -> None:
    payload = contract("session", program["enrollment"])
    payload["progress_note"] = "first line\r\nsecond\tline"
    response = sqlite_client.put(f"/iop/sessions/{program['session']}", json=payload)
    assert response.status_code == 200
    assert response.get_json()["progress_note"] == "first line\r\nsecond\tline"


def test_a_control_character_in_a_decline_reason_is_a_400_naming_the_reason_and_changes_nothing(
    sqlite_client: FlaskClient, program: dict[str, str]
) -> None:
    before = state(sqlite_client)
    response = sqlite_client.post(f"/iop/referrals/{program['referral']}/decline", json={"reason": "full\x00"})
    assert response.status_code == 400
    assert outcome(response) == [("value", "reason")]
    assert state(sqlite_client) == before


def test_a_control_character_in_an_admitted_enrollment_is_a_400_naming_its_field(
    sqlite_client: FlaskClient, program: dict[str, str]
) -> None:
    referral = program["referral"]
    sqlite_client.post(f"/iop/referrals/{referral}/accept", json={"planned_admission": "2026-02-09"})
    before = state(sqlite_client)
    enrollment = {**ADMISSION, "support_contacts": [{"relationship": "spouse", "name": "Alex\x00"}]}
    response = sqlite_client.post(f"/iop/referrals/{referral}/admit", json={"enrollment": enrollment})
    assert response.status_code == 400
    assert outcome(response) == [("value", "enrollment.support_contacts[0].name")]
    assert state(sqlite_client) == before


@pytest.mark.parametrize("value", [2**31, 2**63, 2**64 - 1, -(2**31) - 1])
@pytest.mark.parametrize(
    ("kind", "path", "expression"),
    [
        ("treatment-plan", ("interventions", 0, "frequency"), "interventions[0].frequency"),
        ("discharge", ("continuing_care", "services", 0, "frequency"), "continuing_care.services[0].frequency"),
        ("assessment", ("instruments", 1, "total_score"), "instruments[1].total_score"),
    ],
)
def test_an_integer_beyond_the_fhir_integer_range_is_a_400_naming_the_field_and_changes_nothing(
    sqlite_client: FlaskClient, program: dict[str, str], kind: str, path: tuple[Any, ...], expression: str, value: int
) -> None:
    payload = mutate(contract(kind, program["enrollment"]), path, value, "set")
    before = state(sqlite_client)
    response = sqlite_client.post(f"/iop/{PLURAL[kind]}", data=dumps(payload), content_type=JSON)
    assert response.status_code == 400
    assert ("value", expression) in outcome(response)
    assert "must be between -2147483648 and 2147483647" in response.get_data(as_text=True)
    assert state(sqlite_client) == before


def test_an_integer_at_the_top_of_the_fhir_integer_range_is_accepted(
    sqlite_client: FlaskClient, program: dict[str, str]
) -> None:
    payload = contract("treatment-plan", program["enrollment"])
    payload["interventions"][4]["frequency"] = 2**31 - 1
    response = sqlite_client.put(f"/iop/treatment-plans/{program['treatment-plan']}", json=payload)
    assert response.status_code == 200, response.get_json()


@pytest.mark.parametrize(
    ("kind", "change", "expressions"),
    [
        ("session", ("craving_score", 7), ["enrollment_id", "start", "service"]),
        ("assessment", ("notes", "Other notes"), ["enrollment_id", "kind", "performed_at"]),
        ("consent", ("expires_on", "2027-01-01"), ["enrollment_id", "recipient", "signed_on"]),
        ("treatment-plan", ("status", "on-hold"), ["enrollment_id", "period.start"]),
        ("partner", ("name", "Another name"), ["id"]),
        (
            "enrollment",
            ("level_of_care", "1"),
            [
                "patient.identifiers[0].system",
                "patient.identifiers[0].value",
                "patient.birth_date",
                "admission_date",
                "program",
            ],
        ),
    ],
)
def test_a_record_already_recorded_with_other_content_is_a_409_naming_the_fields_of_its_key(
    sqlite_client: FlaskClient, program: dict[str, str], kind: str, change: tuple[str, Any], expressions: list[str]
) -> None:
    payload = contract(kind, program["enrollment"])
    payload[change[0]] = change[1]
    before = state(sqlite_client)
    response = sqlite_client.post(f"/iop/{PLURAL[kind]}", json=payload)
    assert response.status_code == 409
    assert outcome(response) == [("duplicate", expression) for expression in expressions]
    assert f"PUT /iop/{PLURAL[kind]}/{program[kind]}" in response.get_json()["issue"][0]["diagnostics"]
    assert state(sqlite_client) == before


@pytest.mark.parametrize(
    ("body", "expression"),
    [
        ({"": None}, '[""]'),
        ({"a.b": 1}, '["a.b"]'),
        ({"reason": "x", "a." + "x" * 100: 1}, '["a.' + "x" * 78 + '..."]'),
    ],
)
def test_an_unknown_field_that_is_not_a_plain_name_is_named_quoted(
    sqlite_client: FlaskClient, program: dict[str, str], body: dict[str, Any], expression: str
) -> None:
    before = state(sqlite_client)
    response = sqlite_client.post(f"/iop/enrollments/{program['enrollment']}/retract", json=body)
    assert response.status_code == 400
    assert outcome(response) == [("structure", expression)]
    assert state(sqlite_client) == before


def test_an_unknown_field_that_is_not_a_plain_name_is_named_quoted_inside_a_record(
    sqlite_client: FlaskClient, program: dict[str, str]
) -> None:
    payload = contract("session", program["enrollment"])
    payload["drug_screen"][""] = 1
    response = sqlite_client.post("/iop/sessions", json=payload)
    assert response.status_code == 400
    assert outcome(response) == [("structure", 'drug_screen[""]')]


def test_an_admission_with_an_unknown_empty_field_names_it(sqlite_client: FlaskClient, program: dict[str, str]) -> None:
    response = sqlite_client.post(f"/iop/referrals/{program['referral']}/admit", json={"enrollment": ADMISSION, "": 1})
    assert response.status_code == 400
    assert outcome(response) == [("structure", '[""]')]


@pytest.mark.parametrize("path", ["/iop/sessions", "/iop/referrals", "/iop/deliveries"])
def test_a_query_parameter_without_a_name_is_a_400_naming_the_query(sqlite_client: FlaskClient, path: str) -> None:
    response = sqlite_client.get(f"{path}?=1")
    assert response.status_code == 400
    assert outcome(response) == [("invalid", "query")]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/iop/{plural}/0"),
        ("PUT", "/iop/{plural}/0"),
        ("POST", "/iop/{plural}/0/retract"),
    ],
)
@pytest.mark.parametrize("kind", ["session", "partner", "discharge"])
def test_an_unknown_record_id_is_a_404_naming_the_id(
    sqlite_client: FlaskClient, program: dict[str, str], method: str, path: str, kind: str
) -> None:
    if kind == "partner" and path.endswith("retract"):
        return
    payload = contract(kind, program["enrollment"])
    if kind == "partner":
        payload["id"] = "0"
    response = sqlite_client.open(
        path.format(plural=PLURAL[kind]), method=method, json=payload if method == "PUT" else None
    )
    assert response.status_code == 404
    assert outcome(response) == [("not-found", "id")]


@pytest.mark.parametrize(
    ("kind", "duplicated", "expression"),
    [
        ("session", '"progress_note": "first", "progress_note": "second"', "progress_note"),
        ("assessment", '"instrument": "PHQ-9", "instrument": "GAD-7"', "instrument"),
    ],
)
def test_a_key_given_twice_in_a_record_is_a_400_naming_it_and_changes_nothing(
    sqlite_client: FlaskClient, program: dict[str, str], kind: str, duplicated: str, expression: str
) -> None:
    payload = orjson.dumps(contract(kind, program["enrollment"]))
    body = payload[:-1] + b", " + duplicated.encode() + b"}"
    before = state(sqlite_client)
    response = sqlite_client.post(f"/iop/{PLURAL[kind]}", data=body, content_type=JSON)
    assert response.status_code == 400
    assert outcome(response) == [("structure", expression)]
    assert "appears twice" in response.get_json()["issue"][0]["diagnostics"]
    assert state(sqlite_client) == before


def test_a_key_given_twice_in_a_nested_object_of_a_record_is_named_by_its_path(
    sqlite_client: FlaskClient, program: dict[str, str]
) -> None:
    body = (
        b'{"program": "adult-sud", "level_of_care": "2.1", "admission_date": "2026-02-09",'
        b' "patient": {"family": "A", "family": "B"}}'
    )
    response = sqlite_client.post("/iop/enrollments", data=body, content_type=JSON)
    assert response.status_code == 400
    assert outcome(response) == [("structure", "patient.family")]
