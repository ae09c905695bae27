"""SMART's bulk-data-client (github.com/smart-on-fhir/bulk-data-client, v1.2.1), request for request, against the real
server over HTTP.

The client is not on the npm registry, so it cannot be installed here; `BulkDataClientReplay` sends what it sends:
token endpoint discovery (the host root's .well-known/smart-configuration, or the CapabilityStatement's oauth-uris
extension, whichever answers), SMART Backend Services (client_credentials, a client_assertion signed RS384 or ES384
with iss, sub, aud, exp 300 s ahead, jti and iat, scope system/*.rs), the CapabilityStatement, the kick-off (GET
with the parameters in the query, or a POST of Parameters when ``patient`` is given; Prefer respond-async with
handling=lenient, its default), polling with Accept application/json (X-Progress read with parseInt as a
percentage, Retry-After as seconds or a date, 202 until a 200 manifest, its ``next`` links followed), downloads
accepting gzip, deflate and br with the token when the manifest requires one (each file's lines counted against its
``count``, each line of the file's type), and DELETE of the status URL to cancel.
"""

from __future__ import annotations

import gzip
import re
import secrets
import shutil
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote_plus, urlencode, urljoin, urlsplit

import jwt
import orjson
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask
from werkzeug.serving import make_server

from iop_fhir.app import create_app
from iop_fhir.config import Settings
from iop_fhir.fhir.export import Exporter
from iop_fhir.security.tokens import public_jwk
from tests.auth import mint

USER_AGENT = "SMART-On-FHIR Bulk Data Client / 1.2.1"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
DOWNLOAD_ENCODINGS = "gzip, deflate, br, identity"
ACCESS_TOKEN_LIFETIME_S = 300  # the client's accessTokenLifetime default: the assertion's exp
SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
MAX_POLLS = 60  # a replay that never sees its manifest fails instead of hanging


# -- the client, replayed ---------------------------------------------------------------------------------------


def parse_int(text: str) -> int | None:
    """JavaScript's parseInt(text, 10) after trim: the leading integer, None where it gives NaN."""
    match = re.match(r"\s*([+-]?\d+)", text)
    return int(match.group(1)) if match else None


def fhir_instant(moment: datetime) -> str:
    """What the client sends as ``_since`` (moment's default format): seconds, with the local UTC offset."""
    return moment.astimezone().isoformat(timespec="seconds")


@dataclass
class Exchange:
    """One request the replay sent and what came back, for the failure messages."""

    method: str
    url: str
    request_headers: dict[str, str]
    status: int
    response_headers: dict[str, str]
    body: bytes

    def __str__(self) -> str:
        return (
            f"{self.method} {self.url} {self.request_headers} -> {self.status} {self.response_headers} "
            f"{self.body[:500]!r}"
        )


@dataclass
class Poll:
    status: int
    progress: str
    retry_after: str
    percent: int | None


@dataclass
class ExportRun:
    """A replayed export: its status URL, each poll, the manifest pages, what each file held."""

    status_url: str
    polls: list[Poll] = field(default_factory=list)
    manifests: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # by url
    encodings: dict[str, str] = field(default_factory=dict)  # Content-Encoding of each file, by url

    def output(self) -> dict[str, list[dict[str, Any]]]:
        """Every exported resource, by type."""
        found: dict[str, list[dict[str, Any]]] = {}
        for manifest in self.manifests:
            for item in manifest["output"]:
                found.setdefault(item["type"], []).extend(self.files[item["url"]])
        return found

    def references(self) -> set[str]:
        return {f"{r['resourceType']}/{r['id']}" for resources in self.output().values() for r in resources}


class BulkDataClientReplay:
    """The requests of bulk-data-client's BulkDataClient (src/lib/BulkDataClient.ts, FileDownload.ts, utils.ts),
    with its defaults (config/defaults.js): scope system/*.rs, lenient, Patient/$export unless ``global`` or
    ``group``. Every response that the client would reject fails the test with the exchange that caused it."""

    def __init__(self, fhir_url: str, client_id: str, private_key: Any, kid: str, alg: str) -> None:
        self.fhir_url = fhir_url.rstrip("/") + "/"
        self.client_id = client_id
        self.private_key = private_key
        self.kid = kid
        self.alg = alg
        self.scope = "system/*.rs"
        self.session = requests.Session()
        self.session.headers.clear()  # got sends no defaults but its user agent and the ones set per request
        self.session.headers["user-agent"] = USER_AGENT
        self.exchanges: list[Exchange] = []
        self.token_url = ""
        self.token_response: dict[str, Any] = {}
        self._access_token = ""
        self._expires_at = 0.0

    # transport

    def send(self, method: str, url: str, *, auth: bool = True, **kwargs: Any) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}))
        if auth:
            headers["authorization"] = f"Bearer {self.access_token()}"
        response = self.session.request(method, url, headers=headers, **kwargs)
        body = b"" if kwargs.get("stream") else response.content
        sent = {k: v for k, v in response.request.headers.items() if k.lower() != "authorization"}
        if "authorization" in headers:
            sent["authorization"] = "Bearer <token>"
        sent_url = str(response.request.url)
        self.exchanges.append(Exchange(method, sent_url, sent, response.status_code, dict(response.headers), body))
        return response

    def last(self) -> str:
        return str(self.exchanges[-1])

    # discovery and authorization

    def detect_token_url(self) -> str:
        """utils.detectTokenUrl: Promise.any of the host root's .well-known/smart-configuration (got throws on a
        status that is not 2xx) and the CapabilityStatement's oauth-uris ``token``; neither sends a token."""
        found: list[str] = []
        well_known = self.send(
            "GET",
            urljoin(self.fhir_url, "/.well-known/smart-configuration"),
            auth=False,
            headers={"accept": "application/json", "accept-encoding": "gzip, deflate, br"},
        )
        if well_known.ok:
            found.append(str(well_known.json().get("token_endpoint") or ""))
        metadata = self.capability_statement()
        if metadata.ok:
            try:
                rest = next(r for r in metadata.json()["rest"] if r.get("mode") == "server")
                oauth = next(e for e in rest["security"]["extension"] if e["url"] == OAUTH_URIS)["extension"]
                node = next(e for e in oauth if e["url"] == "token")
                found.append(node.get("valueUri") or node.get("valueUrl") or node.get("valueString") or "")
            except (KeyError, StopIteration, TypeError):
                found.append("")
        assert found, f"neither discovery source answered: {self.exchanges[-2]} / {self.exchanges[-1]}"
        # Promise.any takes whichever answers first: the sources that answer must agree.
        assert len(set(found)) == 1, f"discovery sources disagree: {found}"
        self.token_url = found[0]
        return self.token_url

    def capability_statement(self) -> requests.Response:
        return self.send(
            "GET",
            urljoin(self.fhir_url, "metadata"),
            auth=False,
            headers={"accept": "application/json", "accept-encoding": "gzip, deflate, br"},
        )

    def client_assertion(self) -> str:
        """jsonwebtoken's sign of the client's claims: it adds iat, and typ JWT to the header."""
        now = time.time()
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "exp": round(now) + ACCESS_TOKEN_LIFETIME_S,
            "jti": secrets.token_hex(10),
            "iat": int(now),
        }
        return jwt.encode(claims, self.private_key, algorithm=self.alg, headers={"kid": self.kid, "typ": "JWT"})

    def access_token(self) -> str:
        """getAccessToken: cached until 10 s before it expires."""
        if self._access_token and self._expires_at - 10 > time.time():
            return self._access_token
        assert self.token_url, "detect_token_url first"
        form = {
            "scope": self.scope,
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self.client_assertion(),
        }
        response = self.send(
            "POST",
            self.token_url,
            auth=False,
            data=form,
            headers={"accept": "application/json", "accept-encoding": "gzip, deflate, br"},
        )
        assert response.status_code == 200, self.last()
        body = response.json()
        assert body.get("access_token") and body.get("expires_in"), self.last()
        self.token_response = body
        self._access_token = body["access_token"]
        self._expires_at = time.time() + body["expires_in"]
        return self._access_token

    # the export

    def kick_off(
        self,
        *,
        global_: bool = False,
        group: str | None = None,
        type_: str = "",
        since: str = "",
        elements: str = "",
        patient: str = "",
        post: bool = False,
        lenient: bool = True,
    ) -> str:
        """BulkDataClient.kickOff: the CapabilityStatement first, then the kick-off; the status URL."""
        if global_:
            url = urljoin(self.fhir_url, "$export")
        elif group:
            url = urljoin(self.fhir_url, f"Group/{group}/$export")
        else:
            url = urljoin(self.fhir_url, "Patient/$export")
        self.capability_statement()
        headers = {
            "accept": "application/fhir+json",
            "prefer": "respond-async" + (", handling=lenient" if lenient else ""),
            "accept-encoding": "gzip, deflate, br",
        }
        if post or patient:
            parameters: list[dict[str, Any]] = []
            if since:
                parameters.append({"name": "_since", "valueInstant": since})
            for res_type in re.split(r"\s*,\s*", type_.strip()) if type_ else []:
                parameters.append({"name": "_type", "valueString": res_type})
            if elements:
                parameters.append({"name": "_elements", "valueString": elements})
            for patient_id in re.split(r"\s*,\s*", patient.strip()) if patient else []:
                parameters.append({"name": "patient", "valueReference": {"reference": f"Patient/{patient_id}"}})
            body = orjson.dumps({"resourceType": "Parameters", "parameter": parameters})
            headers["content-type"] = "application/json"  # got's json option
            response = self.send("POST", url, data=body, headers=headers)
        else:
            # URLSearchParams: application/x-www-form-urlencoded, so "," and ":" and "+" are percent-encoded
            query = [(n, v) for n, v in (("_since", since), ("_type", type_), ("_elements", elements)) if v]
            if query:
                url += "?" + urlencode(query, quote_via=quote_plus, safe="*")
            response = self.send("GET", url, headers=headers)
        assert 200 <= response.status_code < 300, self.last()  # got throws on anything else
        location = response.headers.get("content-location")
        assert location, f"the kick-off response did not include content-location: {self.last()}"
        return location

    def wait_for_export(self, status_url: str, on_progress: Callable[[Poll], None] = lambda _: None) -> ExportRun:
        """BulkDataClient.waitForExport: poll until a 200 manifest with no ``next`` link; 202 (or a page with a
        ``next`` link) waits Retry-After, between 0.1 and 60 s, and polls again (the next page if there is one)."""
        run = ExportRun(status_url)
        url = status_url
        pages: set[str] = set()
        for _ in range(MAX_POLLS):
            response = self.send(
                "GET", url, headers={"accept": "application/json", "accept-encoding": "gzip, deflate, br"}
            )
            body = response.json() if response.content else None
            manifest = body if isinstance(body, dict) and "resourceType" not in body else None
            links = (manifest or {}).get("link")
            next_url = next((x.get("url") for x in links if x.get("relation") == "next"), "") if links else ""
            if (next_url or response.status_code == 200) and manifest is not None and url not in pages:
                assert isinstance(manifest.get("output"), list), f"the manifest output is not an array: {self.last()}"
                pages.add(url)
                run.manifests.append(manifest)
                if response.status_code == 200 and not next_url:
                    return run
            if not (response.status_code == 202 or next_url):
                pytest.fail(f"unexpected status response: {self.last()}")
            progress = response.headers.get("x-progress", "").strip()
            retry_after = response.headers.get("retry-after", "").strip()
            poll = Poll(response.status_code, progress, retry_after, parse_int(progress))
            run.polls.append(poll)
            on_progress(poll)
            time.sleep(self.poll_delay(retry_after))
            url = next_url or url
        pytest.fail(f"no manifest after {MAX_POLLS} polls: {self.last()}")

    @staticmethod
    def poll_delay(retry_after: str) -> float:
        """Seconds: Retry-After as seconds when it holds a digit (parseInt: NaN, so at once, for an HTTP date that
        starts with a weekday), otherwise as a date; 200 ms without one."""
        delay_ms: float = 200
        if retry_after:
            if re.search(r"\d+", retry_after):
                seconds = parse_int(retry_after)
                if seconds is None:
                    return 0
                delay_ms = seconds * 1000
            else:
                return 0  # new Date() of a value without a digit is Invalid Date: NaN, at once
        return min(max(delay_ms, 100), 60_000) / 1000

    def download_all(self, run: ExportRun) -> ExportRun:
        """BulkDataClient.downloadAllFiles: every output, deleted and error file of every page, with the token
        when the page says requiresAccessToken; output lines counted against ``count``."""
        for manifest in run.manifests:
            authorize = bool(manifest.get("requiresAccessToken"))
            for kind, expected in (("output", None), ("deleted", "Bundle"), ("error", "OperationOutcome")):
                for item in manifest.get(kind) or []:
                    resource_type = item["type"] if expected is None else expected
                    count = item.get("count") if kind == "output" else None
                    resources, encoding = self.download(item["url"], authorize, resource_type, count)
                    run.files[item["url"]] = resources
                    run.encodings[item["url"]] = encoding
        return run

    def download(
        self, url: str, authorize: bool, resource_type: str, count: int | None
    ) -> tuple[list[dict[str, Any]], str]:
        """FileDownload.run and ParseNDJSON: undecoded bytes, inflated by their Content-Encoding, one resource per
        non-empty line (Parameters lines are headers, not counted), each of ``resource_type``."""
        response = self.send("GET", url, auth=authorize, stream=True, headers={"accept-encoding": DOWNLOAD_ENCODINGS})
        with response:
            raw = response.raw.read(decode_content=False)
        assert response.status_code < 400, f"{self.last()} {raw[:300]!r}"
        encoding = response.headers.get("content-encoding", "")
        if encoding == "gzip":
            text = gzip.decompress(raw)
        elif encoding == "deflate":
            text = zlib.decompress(raw)
        else:
            assert encoding in ("", "identity"), f"{encoding} is not decoded here (brotli is not installed): {url}"
            text = raw
        resources: list[dict[str, Any]] = []
        headers = 0
        for number, line in enumerate(text.decode("utf-8").split("\n"), start=1):
            if not line.strip():
                continue
            resource = orjson.loads(line)
            if resource.get("resourceType") == "Parameters":
                headers += 1
                continue
            assert resource.get("resourceType") == resource_type, f"line {number} of {url}: {line[:200]}"
            resources.append(resource)
        if count is not None:
            assert len(resources) == count, (
                f"{url}: the manifest says {count} resources, the file holds {len(resources)}"
            )
        return resources, encoding or "identity"

    def cancel(self, status_url: str) -> requests.Response:
        """BulkDataClient.cancelExport: DELETE of the status URL (got throws on a status that is not 2xx)."""
        return self.send(
            "DELETE", status_url, headers={"accept": "application/json", "accept-encoding": "gzip, deflate, br"}
        )


# -- the server and its data -------------------------------------------------------------------------------------


@dataclass
class LiveServer:
    app: Flask
    fhir_url: str
    token_url: str
    keys: dict[str, tuple[str, Any]]  # alg -> (client id, private key)

    @property
    def exporter(self) -> Exporter:
        found: Exporter = self.app.extensions["iop_fhir.exports"]
        return found

    def replay(self, alg: str = "ES384") -> BulkDataClientReplay:
        client_id, key = self.keys[alg]
        client = BulkDataClientReplay(self.fhir_url, client_id, key, f"{client_id}-1", alg)
        client.detect_token_url()
        return client

    @contextmanager
    def queue_held(self) -> Iterator[Callable[[], None]]:
        """Jobs kicked off meanwhile wait in the queue (the background thread is off) until the yielded release,
        so that a poll is sure to find them in progress."""
        self.exporter.background = False
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.exporter.background = True

        try:
            yield release
        finally:
            release()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    """A live server (werkzeug, threaded) on an empty SQLite file whose export files hold at most 2 resources, so
    that a type spans several files; one Backend Services client per signing algorithm, registered with its JWKS
    and scope system/*.rs."""
    db = tmp_path_factory.mktemp("bulk") / "iop_fhir.db"
    shutil.copy(request.getfixturevalue("sqlite_template"), db)
    app = create_app(Settings(database_url=f"sqlite:///{db}", export_file_lines=2, seed_conformance=False))
    keys: dict[str, tuple[str, Any]] = {
        "ES384": ("bulk-data-client-es384", ec.generate_private_key(ec.SECP384R1())),
        "RS384": ("bulk-data-client-rs384", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    }
    for alg, (client_id, key) in keys.items():
        jwks = {"keys": [{**public_jwk(key), "kid": f"{client_id}-1", "alg": alg, "use": "sig"}]}
        app.extensions["iop_fhir.clients"].add(client_id, jwks=jwks, scope="system/*.rs")
    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    origin = f"http://127.0.0.1:{http.server_port}"
    yield LiveServer(app, f"{origin}/fhir", f"{origin}/auth/token", keys)
    http.shutdown()
    thread.join()
    http.server_close()
    app.extensions["iop_fhir.store"].close()


class Writer:
    """Writes the data through /fhir with a token of its own, as the programs that feed the service do."""

    def __init__(self, server: LiveServer) -> None:
        self.fhir_url = server.fhir_url
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {mint(server.app, 'system/*.cruds')}"
        self.session.headers["Content-Type"] = "application/fhir+json"

    def create(self, res_type: str, **body: Any) -> str:
        response = self.session.post(
            f"{self.fhir_url}/{res_type}", data=orjson.dumps({"resourceType": res_type, **body})
        )
        assert response.status_code == 201, response.text
        res_id: str = response.json()["id"]
        return res_id

    def update(self, res_type: str, res_id: str, **body: Any) -> None:
        resource = {"resourceType": res_type, "id": res_id, **body}
        response = self.session.put(f"{self.fhir_url}/{res_type}/{res_id}", data=orjson.dumps(resource))
        assert response.status_code == 200, response.text

    def patient(self, family: str, birth_date: str = "1984-02-29") -> str:
        return self.create(
            "Patient",
            name=[{"family": family, "given": ["Sam"]}],
            gender="unknown",
            birthDate=birth_date,
            identifier=[{"system": "urn:oid:2.16.840.1.113883.19.5", "value": f"MRN-{uuid.uuid4().hex[:8]}"}],
        )

    def observation(self, patient: str, text: str) -> str:
        return self.create(
            "Observation", status="final", code={"text": text}, subject={"reference": f"Patient/{patient}"}
        )

    def encounter(self, patient: str) -> str:
        return self.create(
            "Encounter",
            status="finished",
            **{"class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}},
            subject={"reference": f"Patient/{patient}"},
        )


@dataclass(frozen=True)
class Seeded:
    """A patient written for these tests and the references of its compartment (itself among them)."""

    patient: str
    compartment: frozenset[str]


@pytest.fixture(scope="module")
def records(server: LiveServer) -> dict[str, Seeded]:
    """Two patients, each with Observations and an Encounter."""
    writer = Writer(server)
    seeded: dict[str, Seeded] = {}
    for name, observations in (("ada", 3), ("bo", 2)):
        patient = writer.patient(f"Bulk{name.title()}")
        compartment = {
            f"Patient/{patient}",
            f"Encounter/{writer.encounter(patient)}",
            *(f"Observation/{writer.observation(patient, f'check-in {n}')}" for n in range(observations)),
        }
        seeded[name] = Seeded(patient, frozenset(compartment))
    return seeded


def searched(client: BulkDataClientReplay, res_type: str) -> set[str]:
    """What a search by the same client finds of a type."""
    response = client.send(
        "GET", f"{client.fhir_url}{res_type}?_count=1000", headers={"accept": "application/fhir+json"}
    )
    assert response.status_code == 200, client.last()
    return {f"{res_type}/{e['resource']['id']}" for e in response.json().get("entry", [])}


# -- the export as the client runs it ---------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES384", "RS384"])
@pytest.mark.parametrize("global_", [True, False], ids=["system-level", "patient-level-the-clients-default"])
def test_the_clients_export_with_type_in_the_query_downloads_every_file_with_its_manifest_count_of_its_type(
    server: LiveServer, records: dict[str, Seeded], alg: str, global_: bool
) -> None:
    client = server.replay(alg)
    # Discovery found the token endpoint, and the token came from it for the client's signed assertion.
    assert client.token_url == server.token_url
    client.access_token()
    token_request = next(e for e in client.exchanges if e.method == "POST" and e.url == server.token_url)
    assert token_request.status == 200
    assert client.token_response["token_type"].lower() == "bearer"
    assert client.token_response["scope"] == "system/*.rs"

    with server.queue_held() as release:
        status_url = client.kick_off(global_=global_, type_="Patient,Observation")
        kick_off = client.exchanges[-1]
        assert (kick_off.method, kick_off.status) == ("GET", 202)
        assert urlsplit(kick_off.url).query == "_type=Patient%2CObservation"
        assert status_url.startswith(f"{server.fhir_url}/$export-status/")
        run = client.wait_for_export(status_url, on_progress=lambda _: release())

    # The job was held in the queue for the first poll: its answer is sure to be 202 with X-Progress.
    assert [p.status for p in run.polls][:1] == [202]
    assert run.polls[0].progress
    for poll in run.polls:
        if poll.progress:
            assert poll.percent is not None and 0 <= poll.percent <= 100, poll
        assert parse_int(poll.retry_after) is not None, poll
    assert client.exchanges[-1].status == 200
    assert client.exchanges[-1].response_headers["Content-Type"].startswith("application/json")
    [manifest] = run.manifests
    assert manifest["requiresAccessToken"] is True
    assert manifest["request"] == kick_off.url
    assert {item["type"] for item in manifest["output"]} == {"Patient", "Observation"}
    assert manifest["error"] == []

    client.download_all(run)
    downloads = [e for e in client.exchanges if "/$export-file/" in e.url]
    assert len(downloads) == len(manifest["output"]) > 2  # Observations span several files of 2
    for download in downloads:
        assert download.status == 200, download
        assert download.request_headers["accept-encoding"] == DOWNLOAD_ENCODINGS
        assert download.request_headers["authorization"] == "Bearer <token>"
    output = run.output()
    exported = {t: {f"{t}/{r['id']}" for r in resources} for t, resources in output.items()}
    for res_type in ("Patient", "Observation"):
        assert (
            sum(len(run.files[i["url"]]) for i in manifest["output"] if i["type"] == res_type)
            == len(output[res_type])
            == len(exported[res_type])
        )  # no resource in two files
        assert exported[res_type] == searched(client, res_type)
    for seeded in records.values():
        assert {r for r in seeded.compartment if not r.startswith("Encounter/")} <= set().union(*exported.values())


def test_a_patient_level_post_naming_one_patient_exports_only_that_patients_compartment(
    server: LiveServer, records: dict[str, Seeded]
) -> None:
    client = server.replay()
    status_url = client.kick_off(patient=records["ada"].patient)
    kick_off = client.exchanges[-1]
    assert (kick_off.method, kick_off.url, kick_off.status) == ("POST", f"{server.fhir_url}/Patient/$export", 202)
    assert kick_off.request_headers["prefer"] == "respond-async, handling=lenient"
    assert kick_off.request_headers["content-type"] == "application/json"

    run = client.download_all(client.wait_for_export(status_url))

    [manifest] = run.manifests
    assert manifest["error"] == [], run.files
    assert run.references() == records["ada"].compartment
    assert {item["type"] for item in manifest["output"]} == {"Patient", "Observation", "Encounter"}
    assert not run.references() & records["bo"].compartment


def test_elements_in_the_query_keeps_only_the_elements_named_and_the_mandatory_ones(
    server: LiveServer, records: dict[str, Seeded]
) -> None:
    client = server.replay()
    status_url = client.kick_off(global_=True, type_="Patient,Observation", elements="Patient.birthDate,subject")
    assert urlsplit(client.exchanges[-1].url).query == (
        "_type=Patient%2CObservation&_elements=Patient.birthDate%2Csubject"
    )

    output = client.download_all(client.wait_for_export(status_url)).output()

    seeded = {f"Patient/{s.patient}" for s in records.values()}
    assert seeded <= {f"Patient/{p['id']}" for p in output["Patient"]}
    for patient in output["Patient"]:
        assert set(patient) == {"resourceType", "id", "meta", "birthDate"}
    for observation in output["Observation"]:
        assert set(observation) == {"resourceType", "id", "meta", "status", "code", "subject"}  # status, code: 1..1
    for resource in output["Patient"] + output["Observation"]:
        assert SUBSETTED in resource["meta"]["tag"]


def test_since_in_the_query_exports_only_what_changed_after_it(server: LiveServer, records: dict[str, Seeded]) -> None:
    writer = Writer(server)
    changed = writer.patient("BulkChanged")
    unchanged_observation = writer.observation(changed, "before")
    # The client sends whole seconds: _since is the next second, and what follows is written after it.
    since = datetime.fromtimestamp(int(time.time()) + 1)
    time.sleep(max(0.0, since.timestamp() - time.time()) + 0.05)
    writer.update("Patient", changed, name=[{"family": "BulkChanged", "given": ["Kim"]}], gender="unknown")
    new = writer.patient("BulkNew")
    new_observation = writer.observation(new, "after")

    client = server.replay()
    status_url = client.kick_off(global_=True, type_="Patient,Observation", since=fhir_instant(since))
    assert urlsplit(client.exchanges[-1].url).query.startswith(
        "_since=" + fhir_instant(since).replace(":", "%3A").replace("+", "%2B")
    )
    run = client.download_all(client.wait_for_export(status_url))

    assert run.references() == {f"Patient/{changed}", f"Patient/{new}", f"Observation/{new_observation}"}
    assert f"Observation/{unchanged_observation}" not in run.references()
    [patient] = [p for p in run.output()["Patient"] if p["id"] == changed]
    assert (patient["meta"]["versionId"], patient["name"][0]["given"]) == ("2", ["Kim"])


@pytest.mark.parametrize("when", ["while-queued", "after-completion"])
def test_delete_of_the_status_url_cancels_the_export_and_a_later_poll_is_404(
    server: LiveServer, records: dict[str, Seeded], when: str
) -> None:
    client = server.replay()
    with server.queue_held():
        status_url = client.kick_off(global_=True, type_="Patient")
        files: list[str] = []
        if when == "after-completion":
            server.exporter.run_due()
            [manifest] = client.wait_for_export(status_url).manifests
            files = [item["url"] for item in manifest["output"]]
            assert files

        cancelled = client.cancel(status_url)
        assert cancelled.status_code == 202, client.last()  # Bulk Data: 202 Accepted
        assert cancelled.json()["issue"][0]["severity"] == "information"

        poll = client.send("GET", status_url, headers={"accept": "application/json"})
        assert poll.status_code == 404, client.last()
        assert poll.json()["issue"][0]["code"] == "not-found"
        for url in files:
            download = client.send("GET", url, headers={"accept-encoding": DOWNLOAD_ENCODINGS})
            assert download.status_code == 404, client.last()
        assert client.cancel(status_url).status_code == 404, client.last()


def test_the_manifest_requires_the_access_token_and_a_file_fetched_without_it_is_refused_401(
    server: LiveServer, records: dict[str, Seeded]
) -> None:
    client = server.replay()
    [manifest] = client.wait_for_export(client.kick_off(global_=True, type_="Patient")).manifests
    assert manifest["requiresAccessToken"] is True
    url = manifest["output"][0]["url"]

    refused = client.send("GET", url, auth=False, headers={"accept-encoding": DOWNLOAD_ENCODINGS})

    assert refused.status_code == 401, client.last()
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert refused.json()["issue"][0]["code"] == "login"
    resources, _ = client.download(url, True, "Patient", manifest["output"][0]["count"])
    assert resources
