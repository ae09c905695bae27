"""The request limits through the real server (`iop-fhir serve` under gunicorn and under waitress) over raw sockets: a
chunked body over the limit is 413 and nothing cut at the limit is processed; a request line over the server's own
limit, or a target over the app's, is 414 with an OperationOutcome, never an HTML page."""

from __future__ import annotations

import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import requests

from iop_fhir.app import create_app
from iop_fhir.config import Settings
from iop_fhir.limits import MAX_TARGET_BYTES
from tests.auth import mint
from tests.live import serve

LIMIT = 200_000


@pytest.fixture(scope="module", params=["gunicorn", "waitress"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path
) -> Iterator[tuple[str, str]]:
    folder = tmp_path_factory.mktemp(f"limits-{request.param}")
    shutil.copy(sqlite_template, folder / "db.sqlite")
    url = f"sqlite:///{folder / 'db.sqlite'}"
    app = create_app(Settings(database_url=url, seed_conformance=False, token_lifetime=3600))
    token = mint(app, "system/*.cruds", admin=True)
    app.extensions["iop_fhir.store"].close()
    env = {"IOP_FHIR_DATABASE_URL": url, "IOP_FHIR_SEED_CONFORMANCE": "false", "IOP_FHIR_MAX_BODY_BYTES": str(LIMIT)}
    with serve(env, folder / "serve.log", args=("--server", request.param)) as base:
        yield base, token


def exchange(base: str, head: str, body_chunks: list[bytes] = ()) -> tuple[int, dict[str, str], bytes]:  # type: ignore[assignment]
    """Sends ``head`` and then ``body_chunks`` chunked (from another thread, so that a server answering early is
    read), and returns the status, headers and body of the answer."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)

    def send() -> None:
        try:
            for chunk in body_chunks:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            if body_chunks:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed before the whole body was sent

    sock.sendall(head.encode("latin-1"))
    sender = threading.Thread(target=send)
    sender.start()
    received = b""
    try:
        while b"\r\n\r\n" not in received or len(received) < _expected(received):
            data = sock.recv(65536)
            if not data:
                break
            received += data
    finally:
        sender.join(timeout=30)
        sock.close()
    head_bytes, _, body = received.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _expected(received: bytes) -> int:
    head, _, _ = received.partition(b"\r\n\r\n")
    for line in head.decode("latin-1").split("\r\n"):
        if line.lower().startswith("content-length:"):
            return len(head) + 4 + int(line.split(":")[1])
    return 1 << 62


def chunked_request(method: str, path: str, content_type: str, token: str = "") -> str:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\n{auth}"
        "Transfer-Encoding: chunked\r\n\r\n"
    )


def families(base: str, token: str) -> list[str]:
    found = requests.get(f"{base}/fhir/Patient?_count=100", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert found.status_code == 200
    return [e["resource"]["name"][0]["family"] for e in found.json().get("entry", [])]


def test_chunked_create_over_the_limit_is_413_through_the_server_and_nothing_is_stored(
    server: tuple[str, str],
) -> None:
    base, token = server
    resource = orjson.dumps({"resourceType": "Patient", "name": [{"family": "Chunked"}]})
    chunks = [resource] + [b" " * 65536] * (LIMIT // 65536 + 20)
    status, headers, body = exchange(
        base, chunked_request("POST", "/fhir/Patient", "application/fhir+json", token), chunks
    )
    assert status == 413
    assert headers["content-type"].startswith("application/fhir+json")
    assert orjson.loads(body)["issue"][0]["code"] == "too-costly"
    assert "Chunked" not in families(base, token)


def test_chunked_create_under_the_limit_is_stored_whole_through_the_server(server: tuple[str, str]) -> None:
    base, token = server
    resource = orjson.dumps({"resourceType": "Patient", "name": [{"family": "Whole"}]})
    chunks = [resource[:10], resource[10:], b" " * (LIMIT - len(resource) - 10)]
    status, _, body = exchange(base, chunked_request("POST", "/fhir/Patient", "application/fhir+json", token), chunks)
    assert status == 201, body
    assert "Whole" in families(base, token)


def test_chunked_search_over_the_limit_is_413_through_the_server(server: tuple[str, str]) -> None:
    base, token = server
    padding = b"_count=5&" * (LIMIT // 9 + 10)
    chunks = [padding[i : i + 65536] for i in range(0, len(padding), 65536)] + [b"family=Nobody"]
    status, headers, body = exchange(
        base, chunked_request("POST", "/fhir/Patient/_search", "application/x-www-form-urlencoded", token), chunks
    )
    assert status == 413
    assert orjson.loads(body)["resourceType"] == "OperationOutcome"


def test_request_target_over_the_app_limit_is_414_operation_outcome_through_the_server(
    server: tuple[str, str],
) -> None:
    base, _ = server
    path = "/fhir/Patient?family=" + "a" * MAX_TARGET_BYTES
    status, headers, body = exchange(base, f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert status == 414
    assert headers["content-type"].startswith("application/fhir+json")
    assert orjson.loads(body)["issue"][0]["code"] == "too-costly"


def test_request_line_over_the_server_limit_is_414_operation_outcome_not_html(server: tuple[str, str]) -> None:
    base, _ = server
    path = "/fhir/Patient?family=" + "a" * 20_000
    status, headers, body = exchange(base, f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status == 414
    assert headers["content-type"].startswith("application/fhir+json")
    assert orjson.loads(body)["resourceType"] == "OperationOutcome"


def test_malformed_request_line_is_400_operation_outcome_not_html(server: tuple[str, str]) -> None:
    base, _ = server
    status, headers, body = exchange(base, "NOT A REQUEST\r\n\r\n")
    assert status == 400
    assert headers["content-type"].startswith("application/fhir+json")
    assert orjson.loads(body)["issue"][0]["code"] == "invalid"


def test_query_that_is_not_utf8_is_400_through_the_server(server: tuple[str, str]) -> None:
    base, token = server
    answer = requests.get(
        f"{base}/fhir/Patient?family=%ff%fe", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert answer.status_code == 400
    assert answer.json()["issue"][0]["expression"] == ["family"]


def test_chunked_create_far_over_the_limit_is_413_operation_outcome_through_the_server(
    server: tuple[str, str],
) -> None:
    base, token = server
    resource = orjson.dumps({"resourceType": "Patient", "name": [{"family": "FarOver"}]})
    chunks = [resource] + [b" " * 65536] * (16 * LIMIT // 65536)
    head = chunked_request("POST", "/fhir/Patient", "application/fhir+json", token)
    status, headers, body = exchange(base, head, chunks)
    assert status == 413
    assert headers["content-type"].startswith("application/fhir+json")
    assert orjson.loads(body)["issue"][0]["expression"] == ["body"]
    assert "FarOver" not in families(base, token)
