"""The one outbound HTTP path: PartnerClient talks FHIR to a partner and turns every failure into a DeliveryError.

https://hl7.org/fhir/R4/http.html. Bodies and query strings may hold PHI: they are never logged nor put in messages.
"""

from __future__ import annotations

import email.utils
import logging
import math
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urljoin, urlsplit

import orjson
import requests
import requests.auth

import iop_fhir

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
USER_AGENT = f"iop-fhir/{iop_fhir.__version__}"
# Failures of the transport itself: the request may not have arrived, so sending it again later is the answer.
_TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class DeliveryError(Exception):
    """A call to a partner that failed; ``retryable`` says whether sending the same request later may succeed.

    The message names the method, host and path (never the query string or a body), so it can be stored and shown.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        outcome: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status
        self.outcome = outcome
        self.retry_after = retry_after

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "retryable": self.retryable,
            "message": self.message,
            "outcome": self.outcome,
            "retry_after": self.retry_after,
        }


@runtime_checkable
class RenewableAuth(Protocol):
    """An auth whose credential can be dropped after a 401 and fetched anew (SMART backend services)."""

    def invalidate(self, rejected: str | None = None) -> None: ...


def is_retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date (RFC 9110 §10.2.3); None if absent
    or unreadable. A date in the past means 0."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; an offset-less one is read the same way
        when = when.replace(tzinfo=UTC)
    seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, math.ceil(seconds))


def where(method: str, url: str) -> str:
    """``METHOD host/path`` of a request: what may be logged and stored about it (no query string)."""
    parts = urlsplit(url)
    return f"{method} {parts.netloc}{parts.path}"


def error_for_response(response: requests.Response, what: str) -> DeliveryError:
    """The DeliveryError for a non-2xx answer: retryable for 429 and 5xx, keeping the partner's OperationOutcome."""
    status = response.status_code
    outcome = _operation_outcome(response)
    reason = f" {response.reason}" if response.reason else ""
    message = f"{what} answered {status}{reason}"
    if outcome is not None:
        codes = sorted({str(i.get("code")) for i in outcome.get("issue", []) if isinstance(i, dict) and i.get("code")})
        if codes:
            message += f" (OperationOutcome: {', '.join(codes)})"
    return DeliveryError(
        message,
        retryable=is_retryable_status(status),
        status=status,
        outcome=outcome,
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
    )


def error_for_exception(error: requests.RequestException, what: str) -> DeliveryError:
    # str(error) of urllib3 errors repeats the URL with its query string: only the type is kept.
    kind = "timed out" if isinstance(error, requests.Timeout) else "failed"
    return DeliveryError(f"{what} {kind} ({type(error).__name__})", retryable=isinstance(error, _TRANSIENT))


def _operation_outcome(response: requests.Response) -> dict[str, Any] | None:
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        return body
    return None


class PartnerClient:
    """FHIR REST calls to one partner's base URL, with its auth and timeouts.

    Every failure is raised as a DeliveryError: transport errors, timeouts, 429 and 5xx retryable, other answers
    that are not 2xx permanent. On a 401 an auth that can renew its credential (SMART backend services) is asked for a
    fresh one and the request is sent once more.
    """

    def __init__(
        self,
        base_url: str,
        *,
        session: requests.Session | None = None,
        auth: requests.auth.AuthBase | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session if session is not None else requests.Session()
        self.auth = auth
        self.timeout = timeout
        base = urlsplit(self.base_url)
        self._origin = (base.scheme.lower(), base.netloc.lower())

    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """POST a batch or transaction Bundle to the base; the partner's response Bundle."""
        return self._call("POST", self.base_url, body=bundle)

    def update(self, path: str, resource: dict[str, Any]) -> dict[str, Any]:
        """PUT ``base/path`` (``Type/id``, or ``Type?identifier=system|value`` for a conditional update; the caller
        encodes the query). The stored resource the partner returns, or {} when it returns none."""
        return self._call("PUT", self._url(path), body=resource)

    def read(self, path: str) -> dict[str, Any]:
        """GET ``base/path``."""
        return self._call("GET", self._url(path))

    def search(self, res_type: str, params: Mapping[str, str] | list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
        """The resources of a search, page after page, following the ``next`` link of each Bundle.

        Included resources come too (``search.mode`` include); OperationOutcomes the partner adds as ``outcome``
        entries do not. A next link to another origin than the base is refused: it would carry our token there.
        """
        url = self._url(res_type)
        page = self._call("GET", url, params=params)
        seen = {url}
        while True:
            for entry in page.get("entry") or []:
                resource = entry.get("resource") if isinstance(entry, dict) else None
                if isinstance(resource, dict) and (entry.get("search") or {}).get("mode") != "outcome":
                    yield resource
            next_url = _next_link(page)
            if next_url is None:
                return
            next_url = urljoin(url, next_url)
            parts = urlsplit(next_url)
            if (parts.scheme.lower(), parts.netloc.lower()) != self._origin:
                raise DeliveryError(
                    f"GET {self._origin[1]}{urlsplit(url).path}: the next link of the search leads to another "
                    f"origin ({parts.scheme}://{parts.netloc}); refused",
                    retryable=False,
                )
            if next_url in seen:
                raise DeliveryError(f"{where('GET', next_url)}: the next links of the search loop", retryable=False)
            seen.add(next_url)
            url = next_url
            page = self._call("GET", url)

    def _url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def _call(
        self,
        method: str,
        url: str,
        *,
        body: dict[str, Any] | None = None,
        params: Mapping[str, str] | list[tuple[str, str]] | None = None,
    ) -> dict[str, Any]:
        what = where(method, url)
        headers = {"Accept": FHIR_JSON, "User-Agent": USER_AGENT}
        data = None
        if body is not None:
            headers["Content-Type"] = FHIR_JSON
            data = orjson.dumps(body)
        response = self._send(method, url, what, headers=headers, data=data, params=params)
        if response.status_code == 401 and isinstance(self.auth, RenewableAuth):
            self.auth.invalidate(_bearer_token(response.request))
            response = self._send(method, url, what, headers=headers, data=data, params=params)
        if not 200 <= response.status_code < 300:
            raise error_for_response(response, what)
        if not response.content.strip():
            return {}
        try:
            answer = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise DeliveryError(
                f"{what} answered {response.status_code} without a JSON object",
                retryable=False,
                status=response.status_code,
            )
        return answer

    def _send(
        self,
        method: str,
        url: str,
        what: str,
        *,
        headers: dict[str, str],
        data: bytes | None,
        params: Mapping[str, str] | list[tuple[str, str]] | None,
    ) -> requests.Response:
        started = time.perf_counter()
        try:
            response = self.session.request(
                method,
                url,
                params=params,
                data=data,
                headers=headers,
                auth=self.auth,
                timeout=(self.timeout, self.timeout),
                # A redirected POST may become a GET, and Authorization must not follow to another host.
                allow_redirects=False,
            )
        except requests.RequestException as error:
            log.debug("%s -> %s after %.0f ms", what, type(error).__name__, _ms(started))
            raise error_for_exception(error, what) from error
        log.debug("%s -> %d in %.0f ms", what, response.status_code, _ms(started))
        return response


def _next_link(bundle: dict[str, Any]) -> str | None:
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            url: str = link["url"]
            return url
    return None


def _bearer_token(request: requests.PreparedRequest) -> str | None:
    value = request.headers.get("Authorization", "")
    return value[7:] if value[:7].lower() == "bearer " else None


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
