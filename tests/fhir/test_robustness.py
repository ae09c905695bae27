"""Robustness of the /fhir API: whatever a client sends, the answer is never a 500, every error is an
OperationOutcome, and a refused write changes nothing (https://hl7.org/fhir/R4/http.html#Status-Codes).

The first half fuzzes the API with hypothesis (real examples mutated, junk queries, Bundles, patches, headers and
ids), on SQLite; the second half pins each bug the fuzzing or a reading of the code found, with the rule it broke,
on SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import string
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import EXAMPLES
from tests.mutations import mutate, paths

FHIR = "application/fhir+json"
JSON_PATCH = "application/json-patch+json"
FORM = "application/x-www-form-urlencoded"

# Modest on purpose: the suite stays well under 10 minutes (IOP_FHIR_FUZZ_EXAMPLES=5000 for a long hunt). CI
# (CI=true) replays the same examples every run; elsewhere each run explores new ones.
FUZZ = settings(
    max_examples=int(os.environ.get("IOP_FHIR_FUZZ_EXAMPLES", "200")),
    deadline=None,
    database=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _load_examples() -> list[dict[str, Any]]:
    found = []
    for folder in ("us-core", "ds4p", "opioid-cds-drug-screens"):
        for path in sorted((EXAMPLES / folder).glob("*.json")):
            resource = orjson.loads(path.read_bytes())
            if isinstance(resource, dict) and isinstance(resource.get("id"), str):
                found.append(resource)
    return found


REAL = _load_examples()


# -- the property ---------------------------------------------------------------------------------------------


def check(response: Any) -> None:
    """Never a 500; every error an OperationOutcome with at least one issue; a 2xx body, when there is one,
    is JSON (werkzeug's redirects of ``//`` are not the API's)."""
    assert response.status_code < 500, response.get_data()[:2000]
    data = response.get_data()
    if response.status_code >= 400:
        body = orjson.loads(data)
        assert body["resourceType"] == "OperationOutcome", body
        assert body["issue"] and all(i["severity"] and i["code"] for i in body["issue"]), body
    elif data and response.status_code < 300:
        orjson.loads(data)


def history_total(client: FlaskClient) -> int:
    """Every version ever written: a refused write must not add one."""
    response = client.get("/fhir/_history?_count=0")
    assert response.status_code == 200
    total: int = response.get_json()["total"]
    return total


def send(client: FlaskClient, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
    """A request whose refusal (4xx) must leave the store as it was; returns the response, already checked."""
    before = history_total(client) if method != "GET" else None
    response = client.open(path, method=method, data=body, **kwargs)
    if method == "HEAD":  # never a body
        assert response.status_code < 500
    else:
        check(response)
    if before is not None and response.status_code >= 400:
        assert history_total(client) == before, f"{method} {path} was refused but wrote a version"
    return response


@pytest.fixture
def seeded(sqlite_client: FlaskClient) -> Iterator[FlaskClient]:
    """A few real resources to update, patch, search, include and reference."""
    seeds: list[dict[str, Any]] = [
        {"resourceType": "Patient", "id": "p1", "name": [{"family": "Rivera"}], "identifier": [{"value": "1"}]},
        {
            "resourceType": "Observation",
            "id": "o1",
            "status": "final",
            "code": {"text": "x"},
            "subject": {"reference": "Patient/p1"},
        },
    ]
    for resource in seeds + REAL[::8]:
        response = sqlite_client.put(
            f"/fhir/{resource['resourceType']}/{resource['id']}", data=orjson.dumps(resource), content_type=FHIR
        )
        assert response.status_code in (200, 201), response.get_json()
    yield sqlite_client


# -- strategies -----------------------------------------------------------------------------------------------

# Value tables for the strategies below (kept compact: one value per line would be 200 lines).
# fmt: off
ODD_STRINGS: list[Any] = [
    "", " ", "\x00", "\x1f", "\u200b", "é", "ß", "ǅ", "𝔘", "\U0010ffff", "\ud7ff", "\ufeff", "%", "%00", "%zz", "/",
    "?", "#", "&", "=", ",", "|", "\\", "$", ":", ".", "..", "*", "-", "'", '"', "<div>", "null", "NaN", "a" * 65,
    "9" * 30, "1e400", "-0", "²", "٣",
]
REFERENCE_STRINGS: list[Any] = [
    "Patient/p1", "Patient/nope", "Patient/", "Patient/a_b", "Nope/1", "patient/p1", "Patient/p1/_history/x", "#",
    "#missing", "urn:uuid:0", "urn:uuid:11111111-1111-1111-1111-111111111111", "urn:oid:1.2", "urn:x",
    "http://x/fhir/Patient/p1", "http://", "Patient?identifier=1", "Patient?", "?", "", "Patient/" + "a" * 65,
]
DATE_STRINGS: list[Any] = [
    "2021", "2021-02-29", "2020-02-29", "2021-13-01", "0000", "9999-12-31T23:59:59.999999999Z", "2021-01-01T10:00",
    "2021-01-01T25:00:00Z", "2021-01-01T10:00:00+99:99", "2021-01-01T10:00:00+14:00", "yesterday", "1e3", "",
]
RESULT_STRINGS: list[Any] = [
    "0", "1", "-1", "01", "1.5", "1001", "2147483648", "9" * 25, "count", "text", "data", "true", "false", "accurate",
    "none", "estimate", "id,name", "name,", "*", "Patient:*", "Patient:general-practitioner", "Observation:subject",
    "Observation:subject:Patient", "Observation:nope", "Patient:link:Patient:x", "-_lastUpdated", "_id,-_id",
    "name,-birthdate", "-", ",", "code,-date,status", "json", "xml",
]
HEADER_STRINGS: list[Any] = [
    'W/"1"', '"1"', 'W/"0"', 'W/""', "W/", "*", 'W/"²"', f'W/"{"9" * 5000}"', "return=minimal",
    "return=OperationOutcome", "return=representation", "handling=lenient", "handling=strict, return=minimal",
    "identifier=1", "Patient?identifier=1", "Observation?code=x", "_summary=count", "_format=json", "identifier=",
    "application/fhir+json", "application/json", "application/xml", "text/html", "*/*",
    "application/fhir+json; charset=utf-8", "application/json-patch+json", FORM, "multipart/form-data",
]
URL_STRINGS: list[Any] = [
    "Patient", "Patient/p1", "Patient/p1/_history/1", "Patient/p1/_history/²", "Patient?identifier=1", "Patient?",
    "Patient?_count=-1", "Patient?identifier=", "Patient?_format=json", "Observation/o1", "Patient/p1/_history",
    "Patient/_search", "http://testserver/fhir/Patient/p1", "http://other/Patient/1", "/Patient/p1", "Patient//", "",
    "?", "metadata", "$validate", "Patient/" + "a" * 65, "Nope/1", "urn:uuid:11111111-1111-1111-1111-111111111111",
    "Patient/p1?x=y",
]
FULL_URL_VALUES: list[Any] = [
    None, "urn:uuid:11111111-1111-1111-1111-111111111111", "urn:uuid:22222222-2222-2222-2222-222222222222",
    "urn:oid:1.2.3", "http://testserver/fhir/Patient/p9", "http://x/Patient/1", "Patient/1", "", 5,
]
PATCH_PATHS: list[Any] = [
    "", "/", "/id", "/name", "/name/0", "/name/-", "/name/9", "/meta/versionId", "/resourceType", "/a~2",
    "/name/0/family", "name", "/extension",
]
# fmt: on
ODD_TEXT = st.sampled_from(ODD_STRINGS)
TEXT = st.one_of(st.text(max_size=12), ODD_TEXT)
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, -1, 2**31, 2**63, 2**64, 1e308, 5e-324, -0.0]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=8,
)
REFERENCES = st.sampled_from(REFERENCE_STRINGS)
DATES = st.sampled_from(DATE_STRINGS)


def _extension_nested(levels: int) -> str:
    """A valid Extension holding ``levels`` nested extensions: 2 levels of JSON each."""
    return '{"url":"http://x","extension":[' * levels + '{"url":"http://x","valueString":"v"}' + "]}" * levels


def _deep(depth: int, leaf: Any) -> Any:
    """``leaf`` under ``depth`` levels of alternating objects and arrays (invalid FHIR, deep JSON)."""
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"extension": value, "url": "http://x"}
    return value


MUTANTS = st.one_of(
    JSON,
    REFERENCES.map(lambda r: {"reference": r}),
    DATES,
    st.sampled_from([None, [], {}, "", [None], [{}], {"": ""}, {"id": "x"}, {"extension": []}]),
    st.integers(min_value=1, max_value=500).map(lambda d: _deep(d, "v")),
)


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    """A real example with one to three of its elements replaced, deleted, wrapped in an array or copied under an
    unknown name, or with extensions nested as deep as asked."""
    resource = json.loads(json.dumps(draw(st.sampled_from(REAL))))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        candidates = list(paths(resource, max_depth=12))
        path = draw(st.sampled_from(candidates[1:] or candidates))
        how = draw(st.sampled_from(["replace", "delete", "wrap", "unknown", "extension"]))
        if how == "extension":  # valid, and as deep as asked: around the 254 levels orjson writes
            levels = draw(st.integers(min_value=1, max_value=200))
            resource["extension"] = [json.loads(_extension_nested(levels))]
            continue
        resource = mutate(resource, path, copy.deepcopy(draw(MUTANTS)), how)  # drawn values may be shared
        if not isinstance(resource, dict):
            break
    return resource


def dumps(value: Any) -> bytes:
    """JSON as any client may write it: big integers, NaN, and nesting deeper than orjson writes."""
    return json.dumps(value, allow_nan=True).encode()


# Search: mostly well-formed parameters of the searched type (so that a query gets past its first bad parameter
# and into the SQL), with every modifier and prefix on every kind, result parameters, chains, and junk.
SEARCH_TYPES = ["Patient", "Observation", "Condition", "Encounter", "MedicationRequest", "Questionnaire"]
RESULT = ["_count", "_offset", "_sort", "_include", "_revinclude", "_elements", "_summary", "_total", "_format"]
UNSUPPORTED = ["_has", "_list", "_text", "_content", "_type", "_nope", "_filter", "_query"]
MODIFIERS = [":missing", ":not", ":text", ":exact", ":contains", ":below", ":above", ":in", ":of-type", ":iterate"]
MODIFIERS += [":identifier", ":Patient", ":Group", ":Practitioner", ":Nope", ":", "::"]
CHAINS = [".name", ".identifier", ".nope", ".subject.name", ":Patient.name", ":Patient.birthdate", "._id", "."]
PREFIXES = ["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap", "xx"]
LARGE_VALUES = st.one_of(
    st.integers(min_value=1, max_value=6000).map(lambda n: "9" * n),
    st.integers(min_value=300, max_value=10**12).map(lambda n: f"1e{n}"),
    st.integers(min_value=90, max_value=600).map(lambda n: ",".join(f"a{i}" for i in range(n))),
    st.integers(min_value=8000, max_value=60000).map(lambda n: "a" * n),
)
VALUES_BY_KIND: dict[str, st.SearchStrategy[str]] = {
    "token": st.one_of(TEXT, st.sampled_from(["s|v", "|v", "s|", "|", "||", "a|b|c", "http://loinc.org|1-8", "true"])),
    "string": TEXT,
    "uri": st.one_of(TEXT, st.sampled_from(["http://x/a/b", "http://x", "urn:oid:1.2", "http://x/a|1.0"])),
    "date": st.one_of(DATES, st.sampled_from(["2021-01-01T10:00:00Z", "2021-01-01T10:00:00 01:00", "2021-01"])),
    "number": st.one_of(NUMBERS.map(str), st.sampled_from(["1e3", "0.0", "-.5", "5."])),
    "quantity": st.one_of(
        NUMBERS.map(str), st.sampled_from(["5|http://unitsofmeasure.org|mg", "5||mg", "5|mg", "5|a|b|c", "|"])
    ),
    "reference": REFERENCES,
    "composite": st.sampled_from(["http://loinc.org|8480-6$gt5", "a$b", "$", "a$b$c"]),
    "special": TEXT,
}
RESULT_VALUES = st.one_of(st.sampled_from(RESULT_STRINGS), TEXT)


def _sometimes(options: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.just(""), st.just(""), st.sampled_from(options))  # plain two times in three


def _one_in(draw: st.DrawFn, n: int) -> bool:
    return draw(st.integers(min_value=1, max_value=n)) == 1


@st.composite
def search_params(draw: st.DrawFn, res_type: str = "Patient") -> list[tuple[str, str]]:
    from iop_fhir.r4 import definitions

    known = definitions.search_params(res_type) if res_type in definitions.resource_types() else {}
    names = sorted(known) or ["name"]
    pairs = []
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        if _one_in(draw, 4):
            key = draw(st.sampled_from(RESULT)) + draw(st.sampled_from(["", "", "", ":iterate", ":x"]))
            value = draw(st.one_of(RESULT_VALUES, LARGE_VALUES) if _one_in(draw, 4) else RESULT_VALUES)
        else:
            if _one_in(draw, 8):
                name = draw(st.one_of(TEXT, st.sampled_from(UNSUPPORTED)))
            else:
                name = draw(st.sampled_from(names))
            kind = known[name].type if name in known else "string"
            key = name + draw(_sometimes(MODIFIERS)) + draw(_sometimes(CHAINS) if kind == "reference" else st.just(""))
            values = VALUES_BY_KIND.get(kind, TEXT)
            if _one_in(draw, 6):
                value = draw(LARGE_VALUES)
            else:
                value = ",".join(draw(st.lists(values, min_size=1, max_size=3)))
            if kind in ("date", "number", "quantity") or _one_in(draw, 10):
                value = draw(_sometimes(PREFIXES)) + value
        pairs.append((key, value))
    if _one_in(draw, 10):  # now and then, many parameters
        pairs *= draw(st.integers(min_value=2, max_value=40))
    return pairs


@st.composite
def searches(draw: st.DrawFn) -> tuple[str, list[tuple[str, str]]]:
    res_type = draw(st.sampled_from(SEARCH_TYPES) if not _one_in(draw, 20) else TEXT.map(lambda t: quote(t, safe="")))
    return res_type, draw(search_params(res_type))


def query_string(pairs: list[tuple[str, str]], raw: bool) -> str:
    if raw:  # as some clients send them, unencoded; a WSGI server hands the bytes on as latin-1
        return "&".join(f"{k}={v}" for k, v in pairs).encode().decode("latin-1")
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)


HEADER_VALUES = st.one_of(
    TEXT.filter(lambda v: "\n" not in v and "\r" not in v and "\x00" not in v),
    st.sampled_from(HEADER_STRINGS),
)
HEADERS = st.dictionaries(
    st.sampled_from(["If-Match", "If-None-Exist", "If-None-Match", "Prefer", "Accept", "Content-Type"]),
    HEADER_VALUES,
    max_size=3,
)
IDS = st.one_of(
    st.sampled_from(["p1", "o1", "nope", "a" * 64, "a" * 65, "a_b", "a b", "é", ".", "..", "-", "%00", "%2F", "x%zz"]),
    st.text(alphabet=string.printable + "é𝔘\x00", min_size=1, max_size=70).map(lambda t: quote(t, safe="")),
)


# -- fuzz tests -----------------------------------------------------------------------------------------------


@FUZZ
@given(resource=mutated(), method=st.sampled_from(["POST", "PUT", "PUT-conditional", "$validate"]))
def test_mutated_real_resources_are_stored_or_refused_with_an_outcome(
    seeded: FlaskClient, resource: Any, method: str
) -> None:
    res_type = resource.get("resourceType") if isinstance(resource, dict) else None
    res_type = res_type if isinstance(res_type, str) and res_type.isalpha() else "Patient"
    res_id = resource.get("id") if isinstance(resource, dict) else None
    res_id = quote(res_id, safe="") if isinstance(res_id, str) and res_id else "p1"
    path = {
        "POST": f"/fhir/{res_type}",
        "PUT": f"/fhir/{res_type}/{res_id}",
        "PUT-conditional": f"/fhir/{res_type}?_id={res_id}",
        "$validate": f"/fhir/{res_type}/$validate",
    }[method]
    response = send(seeded, "PUT" if method.startswith("PUT") else "POST", path, dumps(resource), content_type=FHIR)
    if response.status_code in (200, 201) and method in ("POST", "PUT"):
        # what was accepted reads back as it was stored, and is found by its id
        stored = response.get_json()
        read = seeded.get(f"/fhir/{res_type}/{stored['id']}")
        assert read.status_code == 200 and read.get_json() == stored
        found = seeded.get(f"/fhir/{res_type}?_id={stored['id']}")
        assert found.status_code == 200 and found.get_json()["total"] == 1


@FUZZ
@given(search=searches(), raw=st.booleans(), lenient=st.booleans(), post=st.booleans())
def test_any_search_query_answers_a_bundle_or_an_outcome(
    seeded: FlaskClient, search: tuple[str, list[tuple[str, str]]], raw: bool, lenient: bool, post: bool
) -> None:
    res_type, pairs = search
    headers = {"Prefer": "handling=lenient"} if lenient else {}
    qs = query_string(pairs, raw)
    if post:
        body = qs.encode("latin-1") if raw else qs.encode()
        response = send(seeded, "POST", f"/fhir/{res_type}/_search", body, content_type=FORM, headers=headers)
    else:
        response = send(seeded, "GET", f"/fhir/{res_type}", environ_overrides={"QUERY_STRING": qs}, headers=headers)
    if response.status_code == 200:
        assert response.get_json()["type"] == "searchset"


@FUZZ
@given(
    res_type=st.sampled_from(["Patient", "_history", "Observation"]),
    pairs=st.lists(
        st.tuples(
            st.sampled_from(["_count", "_offset", "_since", "_at", "_format", "_sort", "x"]),
            st.one_of(RESULT_VALUES, DATES, LARGE_VALUES),
        ),
        max_size=4,
    ),
    raw=st.booleans(),
)
def test_any_history_query_answers_a_bundle_or_an_outcome(
    seeded: FlaskClient, res_type: str, pairs: list[tuple[str, str]], raw: bool
) -> None:
    path = "/fhir/_history" if res_type == "_history" else f"/fhir/{res_type}/_history"
    send(seeded, "GET", path, environ_overrides={"QUERY_STRING": query_string(pairs, raw)})


URLS = st.one_of(st.sampled_from(URL_STRINGS), TEXT)
FULL_URLS = st.sampled_from(FULL_URL_VALUES)
LINKED = st.sampled_from(
    [
        {"resourceType": "Patient", "link": [{"type": "seealso", "other": {"reference": r}}]}
        for r in (
            "urn:uuid:11111111-1111-1111-1111-111111111111",
            "urn:uuid:22222222-2222-2222-2222-222222222222",
            "Patient?identifier=1",
            "Patient?_format=json",
            "http://testserver/fhir/Patient/p9",
        )
    ]
)


@st.composite
def bundle_entries(draw: st.DrawFn) -> Any:
    request: dict[str, Any] = {
        "method": draw(st.one_of(st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]), SCALARS)),
        "url": draw(st.one_of(URLS, SCALARS)),
    }
    for field in ("ifMatch", "ifNoneExist", "ifNoneMatch"):
        if draw(st.booleans()):
            request[field] = draw(st.one_of(HEADER_VALUES, SCALARS))
    entry: dict[str, Any] = {"request": request}
    full_url = draw(FULL_URLS)
    if full_url is not None:
        entry["fullUrl"] = full_url
    resource = draw(st.one_of(st.none(), mutated(), LINKED, st.sampled_from(REAL), JSON, json_patch_binaries()))
    if resource is not None:
        entry["resource"] = resource
    return draw(st.one_of(st.just(entry), st.just(entry), JSON))


@FUZZ
@given(
    kind=st.one_of(st.sampled_from(["transaction", "batch"]), SCALARS),
    entries=st.one_of(st.lists(bundle_entries(), max_size=5), JSON),
)
def test_any_batch_or_transaction_answers_a_response_bundle_or_an_outcome(
    seeded: FlaskClient, kind: Any, entries: Any
) -> None:
    bundle = {"resourceType": "Bundle", "type": kind, "entry": entries}
    response = send(seeded, "POST", "/fhir", dumps(bundle), content_type=FHIR)
    if response.status_code == 200:
        body = response.get_json()
        assert body["type"] == f"{kind}-response"
        for entry in body["entry"]:
            status = entry["response"]["status"]
            assert int(status.split()[0]) < 500, entry
            if int(status.split()[0]) >= 400:
                assert entry["response"]["outcome"]["resourceType"] == "OperationOutcome"


PATCH_OPS = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {
                "op": st.one_of(st.sampled_from(["add", "remove", "replace", "move", "copy", "test"]), SCALARS),
                "path": st.one_of(st.sampled_from(PATCH_PATHS), SCALARS),
            },
            optional={"value": MUTANTS, "from": st.sampled_from(["/name", "/name/0", "/id", "", "/x", 5])},
        ),
        JSON,
    ),
    max_size=4,
)


@st.composite
def json_patch_binaries(draw: st.DrawFn) -> dict[str, Any]:
    ops = draw(PATCH_OPS)
    return {
        "resourceType": "Binary",
        "contentType": draw(st.sampled_from([JSON_PATCH, "application/json", 5])),
        "data": draw(st.sampled_from([base64.b64encode(dumps(ops)).decode(), "!!", "", "e30="])),
    }


@FUZZ
@given(ops=st.one_of(PATCH_OPS, JSON), res_id=st.sampled_from(["p1", "o1", "nope"]))
def test_any_json_patch_is_applied_or_refused_with_an_outcome(seeded: FlaskClient, ops: Any, res_id: str) -> None:
    res_type = "Observation" if res_id == "o1" else "Patient"
    send(seeded, "PATCH", f"/fhir/{res_type}/{res_id}", dumps(ops), content_type=JSON_PATCH)


@FUZZ
@given(
    method=st.sampled_from(["GET", "PUT", "POST", "PATCH", "DELETE", "HEAD", "OPTIONS"]),
    target=st.sampled_from(["{t}", "{t}/{i}", "{t}/{i}/_history", "{t}/{i}/_history/{v}", "{t}/{i}/$validate", ""]),
    res_type=st.one_of(st.sampled_from(["Patient", "Observation"]), TEXT.map(lambda t: quote(t, safe=""))),
    res_id=IDS,
    version=st.one_of(st.sampled_from(["1", "2", "0", "²", "9" * 30, "-1", "1.0"]), TEXT.map(lambda t: quote(t))),
    headers=HEADERS,
    body=st.one_of(st.none(), st.sampled_from(REAL), mutated(), PATCH_OPS, JSON),
)
def test_any_interaction_with_odd_ids_and_headers_answers_without_a_500(
    seeded: FlaskClient,
    method: str,
    target: str,
    res_type: str,
    res_id: str,
    version: str,
    headers: dict[str, str],
    body: Any,
) -> None:
    path = "/fhir/" + target.format(t=res_type, i=res_id, v=version)
    content_type = headers.pop("Content-Type", JSON_PATCH if method == "PATCH" else FHIR)
    data = None if body is None else dumps(body)
    send(seeded, method, path, data, content_type=content_type, headers=headers)


# -- regressions, each a rule the fuzzing or a reading found broken ---------------------------------------------


def outcome_issue(response: Any) -> tuple[str, str | None]:
    """(code, expression) of the first issue of an OperationOutcome response."""
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome", body
    issue = body["issue"][0]
    return issue["code"], (issue.get("expression") or [None])[0]


def patient(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": "Rivera"}], "identifier": [{"value": "1"}], **extra}


def create(client: FlaskClient, resource: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"/fhir/{resource['resourceType']}", data=orjson.dumps(resource), content_type=FHIR)
    assert response.status_code == 201, response.get_json()
    created: dict[str, Any] = response.get_json()
    return created


def state(client: FlaskClient, res_type: str = "Patient") -> tuple[Any, Any, Any]:
    """What a refused write must leave unchanged: the type's search, its history, the whole history."""
    search = client.get(f"/fhir/{res_type}?_count=100&_sort=_id").get_json()
    history = client.get(f"/fhir/{res_type}/_history").get_json()
    everything = client.get("/fhir/_history?_count=0").get_json()["total"]
    return (
        [e["resource"] for e in search.get("entry", [])],
        [(e["fullUrl"], e["response"]["etag"]) for e in history.get("entry", [])],
        everything,
    )


@pytest.mark.parametrize("method", ["GET", "DELETE", "PUT"])
def test_a_query_string_that_is_not_utf8_is_refused_as_bad_syntax(client: FlaskClient, method: str) -> None:
    before = state(client)
    response = client.open(
        "/fhir/Patient",
        method=method,
        data=orjson.dumps(patient()) if method == "PUT" else None,
        content_type=FHIR,
        environ_overrides={"QUERY_STRING": "identifier=\xff\xfe"},  # raw bytes, as a WSGI server passes them
    )
    assert response.status_code == 400
    assert outcome_issue(response) == ("invalid", "identifier")
    assert state(client) == before


@pytest.mark.parametrize("version", ["²", "٣", "9" * 30, "9" * 5000, "0", "1.0"])
def test_vread_of_a_version_that_cannot_exist_is_404(client: FlaskClient, version: str) -> None:
    created = create(client, patient())
    response = client.get(f"/fhir/Patient/{created['id']}/_history/{version}")
    assert response.status_code == 404
    assert outcome_issue(response) == ("not-found", None)


@pytest.mark.parametrize("etag", ['W/"²"', 'W/"' + "9" * 5000 + '"', 'W/"99999999999"', 'W/"0"', 'W/"-1"'])
def test_if_match_that_is_not_a_version_is_400_naming_the_header(client: FlaskClient, etag: str) -> None:
    created = create(client, patient())
    before = state(client)
    response = client.put(
        f"/fhir/Patient/{created['id']}", data=orjson.dumps(created), content_type=FHIR, headers={"If-Match": etag}
    )
    assert response.status_code == 400
    assert outcome_issue(response) == ("invalid", "If-Match")
    assert state(client) == before


@pytest.mark.parametrize("kind", ["transaction", "batch"])
def test_bundle_if_match_that_is_not_a_version_is_400_naming_the_entry(client: FlaskClient, kind: str) -> None:
    created = create(client, patient())
    entry = {"request": {"method": "PUT", "url": f"Patient/{created['id']}", "ifMatch": 'W/"²"'}, "resource": created}
    response = client.post(
        "/fhir", data=orjson.dumps({"resourceType": "Bundle", "type": kind, "entry": [entry]}), content_type=FHIR
    )
    if kind == "transaction":
        assert response.status_code == 400
        assert outcome_issue(response) == ("invalid", "Bundle.entry[0].request.ifMatch")
    else:
        assert response.status_code == 200
        assert response.get_json()["entry"][0]["response"]["status"] == "400 Bad Request"


@pytest.mark.parametrize("count", ["1001", "9" * 30, "9" * 5000])
@pytest.mark.parametrize("path", ["/fhir/Patient", "/fhir/_history", "/fhir/Patient/_history"])
def test_count_above_the_maximum_is_capped_however_long(client: FlaskClient, path: str, count: str) -> None:
    create(client, patient())
    response = client.get(f"{path}?_count={count}")
    assert response.status_code == 200
    assert "_count=1000" in response.get_json()["link"][0]["url"]


@pytest.mark.parametrize("path", ["/fhir/Patient", "/fhir/_history"])
@pytest.mark.parametrize("count", ["-1", "+1", "1.5", "٣", "1_0"])
def test_count_that_is_not_a_non_negative_integer_is_400(client: FlaskClient, path: str, count: str) -> None:
    response = client.get(f"{path}?_count={quote(count)}")
    assert response.status_code == 400
    assert outcome_issue(response) == ("invalid", "_count")


@pytest.mark.parametrize("path", ["/fhir/Patient", "/fhir/_history", "/fhir/Patient/_history"])
@pytest.mark.parametrize("offset", ["2147483648", "9" * 30])
def test_offset_beyond_the_deepest_page_is_400(client: FlaskClient, path: str, offset: str) -> None:
    response = client.get(f"{path}?_offset={offset}")
    assert response.status_code == 400
    assert outcome_issue(response) == ("invalid", "_offset")


@pytest.mark.parametrize("value", ["1e99999999999", "1e400", "-1e400", "gt1e309"])
@pytest.mark.parametrize("param", ["value-quantity", "combo-value-quantity"])
def test_number_beyond_float_range_is_400_naming_the_parameter(client: FlaskClient, value: str, param: str) -> None:
    response = client.get(f"/fhir/Observation?{param}={value}")
    assert response.status_code == 400
    assert outcome_issue(response) == ("invalid", param)


@pytest.mark.parametrize("query", ["name=a%00b", "identifier=x%00", "name%00=a", "_id=a%00"])
def test_search_value_with_nul_is_400_naming_the_parameter(client: FlaskClient, query: str) -> None:
    response = client.get(f"/fhir/Patient?{query}")
    assert response.status_code == 400
    assert outcome_issue(response)[0] == "invalid"
    assert outcome_issue(response)[1] == query.split("=")[0].replace("%00", "\x00")


@pytest.mark.parametrize("path", ["Patient/a%00b", "Patient/a%00b/_history", "Patient/a%00b/_history/1"])
def test_read_of_an_id_with_nul_is_404(client: FlaskClient, path: str) -> None:
    response = client.get(f"/fhir/{path}")
    assert response.status_code == 404
    assert outcome_issue(response) == ("not-found", None)


@pytest.mark.parametrize("res_id", ["a" * 65, "a_b", "a%20b", "%C3%A9", "a%00b", "a%2Ab"])
@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
def test_write_to_an_id_that_is_not_a_fhir_id_is_400_naming_the_id(
    client: FlaskClient, res_id: str, method: str
) -> None:
    create(client, patient())
    before = state(client)
    body = {"PUT": orjson.dumps(patient(id=res_id)), "PATCH": b"[]", "DELETE": None}[method]
    content_type = JSON_PATCH if method == "PATCH" else FHIR
    response = client.open(f"/fhir/Patient/{res_id}", method=method, data=body, content_type=content_type)
    assert response.status_code == 400
    assert outcome_issue(response) == ("value", "Patient.id")
    assert "is not a valid resource id: 1 to 64 characters" in response.get_json()["issue"][0]["diagnostics"]
    assert state(client) == before


def test_write_to_an_id_of_64_characters_is_accepted(client: FlaskClient) -> None:
    res_id = "a" * 64
    assert (
        client.put(f"/fhir/Patient/{res_id}", data=orjson.dumps(patient(id=res_id)), content_type=FHIR).status_code
        == 201
    )
    assert client.delete(f"/fhir/Patient/{res_id}").status_code == 204


@pytest.mark.parametrize(
    ("element", "value", "expression"),
    [
        ("name", [{"family": "a\x00b"}], "Patient.name[0].family"),
        ("identifier", [{"system": "urn:x\x00", "value": "1"}], "Patient.identifier[0].system"),
        ("identifier", [{"value": "1\x1f"}], "Patient.identifier[0].value"),
        ("gender", "male\x00", "Patient.gender"),
        (
            "text",
            {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">\x00</div>'},
            "Patient.text.div",
        ),
    ],
)
def test_control_characters_in_a_string_are_refused_with_their_path(
    client: FlaskClient, element: str, value: Any, expression: str
) -> None:
    before = state(client)
    response = client.post("/fhir/Patient", data=orjson.dumps(patient(**{element: value})), content_type=FHIR)
    assert response.status_code == 400
    assert outcome_issue(response) == ("value", expression)
    assert state(client) == before


def test_tab_cr_and_lf_in_a_string_are_accepted(client: FlaskClient) -> None:
    created = create(client, patient(name=[{"family": "a\tb", "text": "line\r\nline"}]))
    assert created["name"][0]["text"] == "line\r\nline"


def test_reference_type_that_is_not_a_resource_type_is_stored_but_not_indexed_as_one(client: FlaskClient) -> None:
    long_type = "http://example.org/fhir/StructureDefinition/" + "x" * 80
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": "http://elsewhere.example.org/subjects/17", "type": long_type},
    }
    created = create(client, observation)
    found = client.get("/fhir/Observation?subject=http://elsewhere.example.org/subjects/17").get_json()
    assert [e["resource"]["id"] for e in found["entry"]] == [created["id"]]


@pytest.mark.parametrize(
    "query",
    ["identifier=", "_format=json", "name=&_pretty=true", "identifier:missing="],
)
@pytest.mark.parametrize("method", ["DELETE", "PUT"])
def test_conditional_write_without_criteria_is_400_and_touches_nothing(
    client: FlaskClient, query: str, method: str
) -> None:
    create(client, patient())  # the only Patient: a condition matching everything would pick it
    before = state(client)
    body = orjson.dumps(patient()) if method == "PUT" else None
    response = client.open(f"/fhir/Patient?{query}", method=method, data=body, content_type=FHIR)
    assert response.status_code == 400
    assert outcome_issue(response) == ("invalid", "url")
    assert state(client) == before


@pytest.mark.parametrize(
    "condition", ["identifier=1&_summary=count", "identifier=1&_offset=1", "_count=0&identifier=1"]
)
def test_conditional_create_with_result_parameters_is_400_and_creates_nothing(
    client: FlaskClient, condition: str
) -> None:
    create(client, patient())
    before = state(client)
    response = client.post(
        "/fhir/Patient", data=orjson.dumps(patient()), content_type=FHIR, headers={"If-None-Exist": condition}
    )
    assert response.status_code == 400
    assert outcome_issue(response) == ("invalid", "If-None-Exist")
    assert state(client) == before


@pytest.mark.parametrize("condition", ["identifier=1&_offset=1", "identifier=1&_sort=-_id&_count=1"])
def test_conditional_delete_with_result_parameters_is_400_and_deletes_nothing(
    client: FlaskClient, condition: str
) -> None:
    create(client, patient())
    create(client, patient())  # two matches: the offset or sort must not pick one of them to delete
    before = state(client)
    response = client.delete(f"/fhir/Patient?{condition}")
    assert response.status_code == 400
    assert outcome_issue(response) == ("invalid", "url")
    assert state(client) == before


@pytest.mark.parametrize("body", [b"null", b"[]", b"5", b'"Patient"'])
def test_body_that_is_not_a_json_object_is_400_naming_the_resource(client: FlaskClient, body: bytes) -> None:
    response = client.post("/fhir/Patient", data=body, content_type=FHIR)
    assert response.status_code == 400
    assert outcome_issue(response) == ("structure", "Patient")


@pytest.mark.parametrize(
    ("entry", "expression"),
    [
        ({"request": {"method": "DELETE", "url": "Patient?identifier="}}, "Bundle.entry[1].request.url"),
        (
            {"request": {"method": "POST", "url": "Patient", "ifNoneExist": "_format=json"}, "resource": patient()},
            "Bundle.entry[1].request.ifNoneExist",
        ),
        (
            {
                "request": {"method": "POST", "url": "Observation"},
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "x"},
                    "subject": {"reference": "Patient?_format=json"},
                },
            },
            "Bundle.entry[1].resource.subject.reference",
        ),
    ],
)
def test_transaction_condition_without_criteria_is_400_and_the_transaction_writes_nothing(
    client: FlaskClient, entry: dict[str, Any], expression: str
) -> None:
    create(client, patient())
    before = state(client)
    first = {"request": {"method": "POST", "url": "Patient"}, "resource": patient()}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [first, entry]}
    response = client.post("/fhir", data=orjson.dumps(bundle), content_type=FHIR)
    assert response.status_code == 400
    assert outcome_issue(response) == ("invalid", expression)
    assert state(client) == before


def test_valid_resource_nested_deeper_than_can_be_stored_is_400_too_costly(client: FlaskClient) -> None:
    body = '{"resourceType":"Patient","extension":[' + _extension_nested(130) + "]}"
    before = state(client)
    response = client.post("/fhir/Patient", data=body, content_type=FHIR)
    assert response.status_code == 400
    assert outcome_issue(response) == ("too-costly", "Patient")
    assert state(client) == before
    shallow = '{"resourceType":"Patient","extension":[' + _extension_nested(100) + "]}"
    assert client.post("/fhir/Patient", data=shallow, content_type=FHIR).status_code == 201


def test_json_patch_adding_a_value_nested_too_deeply_is_422(client: FlaskClient) -> None:
    created = create(client, patient())
    before = state(client)
    value = "[" * 1000 + "]" * 1000
    ops = f'[{{"op":"add","path":"/name/0/given","value":{value}}}]'
    response = client.patch(f"/fhir/Patient/{created['id']}", data=ops, content_type=JSON_PATCH)
    assert response.status_code == 422
    assert outcome_issue(response) == ("processing", "body")
    assert state(client) == before


def test_json_patch_making_the_resource_too_deep_to_store_is_400_and_changes_nothing(client: FlaskClient) -> None:
    created = create(client, patient())
    before = state(client)
    ops = f'[{{"op":"add","path":"/extension","value":[{_extension_nested(130)}]}}]'
    response = client.patch(f"/fhir/Patient/{created['id']}", data=ops, content_type=JSON_PATCH)
    assert response.status_code == 400
    assert outcome_issue(response) == ("too-costly", "Patient")
    assert state(client) == before


@pytest.mark.parametrize("kind", ["transaction", "batch"])
def test_bundle_entry_nested_near_the_parser_limit_is_400_too_costly(client: FlaskClient, kind: str) -> None:
    deep = "[" * 1000 + "]" * 1000
    body = (
        f'{{"resourceType":"Bundle","type":"{kind}","entry":[{{"request":{{"method":"POST","url":"Patient"}},'
        f'"resource":{{"resourceType":"Patient","x":{deep}}}}}]}}'
    )
    before = state(client)
    response = client.post("/fhir", data=body, content_type=FHIR)
    if kind == "transaction":
        assert response.status_code == 400
        assert outcome_issue(response) == ("too-costly", "Bundle.entry[0].resource")
    else:
        entry = response.get_json()["entry"][0]["response"]
        assert entry["status"] == "400 Bad Request"
        assert entry["outcome"]["issue"][0]["expression"] == ["Bundle.entry[0].resource"]
    assert state(client) == before


@pytest.mark.parametrize(
    ("query", "expression"),
    [
        ("name=" + ",".join(f"a{i}" for i in range(101)), "name"),
        ("&".join(f"name=a{i}" for i in range(33)), "name"),
        ("&".join("_include=Patient:general-practitioner" for _ in range(17)), "_include"),
        ("name:contains=" + "a" * 8193, "name:contains"),
    ],
)
def test_search_beyond_the_served_size_is_400_too_costly(client: FlaskClient, query: str, expression: str) -> None:
    response = client.post("/fhir/Patient/_search", data=query, content_type=FORM)
    assert response.status_code == 400
    assert outcome_issue(response) == ("too-costly", expression)


def test_search_at_the_served_size_is_answered(client: FlaskClient) -> None:
    query = "&".join(f"name=a{i}" for i in range(31)) + "&identifier=" + ",".join(f"s|{i}" for i in range(100))
    assert client.post("/fhir/Patient/_search", data=query, content_type=FORM).status_code == 200


def test_sort_key_given_twice_is_400(client: FlaskClient) -> None:
    response = client.get("/fhir/Patient?_sort=_id,-_id")
    assert response.status_code == 400
    assert outcome_issue(response) == ("invalid", "_sort")


def test_string_prefix_search_ending_before_the_surrogates_is_answered(client: FlaskClient) -> None:
    created = create(client, patient(name=[{"family": "a\ud7ff"}]))
    found = client.get(f"/fhir/Patient?family={quote('a' + chr(0xD7FF))}").get_json()
    assert [e["resource"]["id"] for e in found["entry"]] == [created["id"]]


def test_validate_with_parameters_whose_parameter_is_not_an_array_is_400(client: FlaskClient) -> None:
    body = {"resourceType": "Parameters", "parameter": 5}
    response = client.post("/fhir/Patient/$validate", data=orjson.dumps(body), content_type=FHIR)
    assert response.status_code == 400
    assert outcome_issue(response) == ("invalid", "Parameters.parameter")
