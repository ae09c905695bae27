"""Limits on what a request may be, enforced before any view runs, whatever the server in front does.

- The body: at most ``MAX_CONTENT_LENGTH`` bytes (Settings.max_body_bytes), 413 above it however it is framed. A
  ``Content-Length`` above the limit is refused unread; a chunked body (no ``Content-Length``) is read here, up to
  one byte past the limit, and then handed on whole with its length, so that no reader ever sees a body cut at the
  limit (werkzeug's own limit on a chunked stream stops reading at the limit without telling the reader).
- The query string: every name and value, once percent-decoded, is UTF-8 (400 naming the parameter otherwise; werkzeug
  would turn the bad bytes into U+FFFD and search for that).
- The request target (path and query): at most ``MAX_TARGET_BYTES``, 414 above it. The servers' own limit on the
  request line is set above it (cli.py), so that every request that reaches the app gets an OperationOutcome.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson
from flask import Flask, request

from iop_fhir.errors import BadRequest, FhirError, Issue, PayloadTooLarge, operation_outcome

# The longest request target (path and query string) accepted; gunicorn's limit_request_line (cli.py) is above it.
MAX_TARGET_BYTES = 8000
_TOO_LARGE = "iop_fhir.body_too_large"
_READ_SIZE = 64 * 1024


class UriTooLong(FhirError):
    status = 414
    default_code = "too-costly"


class BodyLimit:
    """WSGI middleware: buffers a chunked request body up to the app's ``MAX_CONTENT_LENGTH`` and marks a request
    whose body is over it (the app answers 413 before routing, see ``install``)."""

    def __init__(self, wsgi_app: Any, app: Flask) -> None:
        self.wsgi_app = wsgi_app
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        limit = self.app.config.get("MAX_CONTENT_LENGTH")
        if limit is not None:
            _limit_body(environ, int(limit))
        return self.wsgi_app(environ, start_response)  # type: ignore[no-any-return]


def _limit_body(environ: dict[str, Any], limit: int) -> None:
    raw_length = (environ.get("CONTENT_LENGTH") or "").strip()
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    if raw_length and not chunked:
        try:
            if int(raw_length) > limit:
                environ[_TOO_LARGE] = True
        except ValueError:
            pass  # werkzeug treats a malformed Content-Length as no body
        return
    if not chunked and not environ.get("wsgi.input_terminated"):
        return  # no body framing the server vouches for: werkzeug reads no body at all
    stream = environ["wsgi.input"]
    data = bytearray()
    while len(data) <= limit:
        chunk = stream.read(min(_READ_SIZE, limit + 1 - len(data)))
        if not chunk:
            break
        data.extend(chunk)
    environ.pop("HTTP_TRANSFER_ENCODING", None)
    if len(data) > limit:
        environ[_TOO_LARGE] = True
        environ["wsgi.input"] = io.BytesIO(b"")
        environ["CONTENT_LENGTH"] = "0"
    else:
        environ["wsgi.input"] = io.BytesIO(bytes(data))
        environ["CONTENT_LENGTH"] = str(len(data))


def install(app: Flask) -> None:
    """Installs the body limit and the request-target check; call before any other ``before_request`` hook, so that
    an oversized request is refused before anything else looks at it."""
    app.wsgi_app = BodyLimit(app.wsgi_app, app)  # type: ignore[method-assign]

    @app.before_request
    def _check_limits() -> None:
        if request.environ.get(_TOO_LARGE):
            limit = app.config.get("MAX_CONTENT_LENGTH")
            raise PayloadTooLarge(f"the request body is larger than the limit of {limit} bytes", "body")
        environ = request.environ
        raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")  # the target as sent (gunicorn, waitress)
        target = len(raw) if raw else len(environ.get("PATH_INFO", "")) + 1 + len(environ.get("QUERY_STRING", ""))
        if target > MAX_TARGET_BYTES:
            raise UriTooLong(
                f"the request path and query string are {target} bytes long; at most {MAX_TARGET_BYTES} are "
                "accepted (send a long search as POST [type]/_search with a form body)",
                "url",
            )
        _check_query(environ.get("QUERY_STRING", ""))


def _check_query(query: str) -> None:
    """400 naming the parameter whose name or value is not UTF-8 once percent-decoded (RFC 3986 §2.5, FHIR R4 §3.1.1.5:
    a query is UTF-8). The WSGI environ gives the raw bytes as a latin-1 string."""
    if query.isascii() and "%" not in query:
        return
    for part in query.split("&"):
        name, _, value = part.partition("=")
        for piece in (name, value):
            try:
                unquote_to_bytes(piece.replace("+", " ").encode("latin-1")).decode("utf-8")
            except (UnicodeDecodeError, UnicodeEncodeError):
                shown = unquote_to_bytes(name.encode("latin-1", "replace")).decode("utf-8", "replace")[:100]
                raise BadRequest(
                    f"the query parameter '{shown}' is not UTF-8 once percent-decoded (percent-encode the UTF-8 "
                    "bytes of the value)",
                    shown or "query",  # a parameter with no name: the query string is what is named
                ) from None


def server_error(status: int, reason: str, message: str) -> bytes:
    """The whole HTTP response a server writes for a request it refuses before the app sees it (a request line or
    header over its limits, a malformed request): an OperationOutcome, like every other error of the service."""
    code = {414: "too-costly", 431: "too-costly", 403: "forbidden", 501: "not-supported"}.get(status, "invalid")
    if status >= 500 and status != 501:
        code = "exception"
    body = orjson.dumps(operation_outcome([Issue(code, message or reason)]))
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/fhir+json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def gunicorn_write_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """Stands in for ``gunicorn.util.write_error`` (its HTML page; gunicorn has no setting for it)."""
    from gunicorn import util

    util.write_nonblock(sock, server_error(status_int, reason, mesg))
