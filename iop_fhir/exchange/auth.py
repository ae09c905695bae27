"""How iop-fhir proves who it is to a partner: a bearer token, or SMART backend services (a signed JWT client
assertion exchanged for an access token, cached until shortly before it expires). Secrets come from files or the
environment when a client is built; they are never stored, logged or put in error messages.

https://hl7.org/fhir/smart-app-launch/backend-services.html, RFC 7523.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
import orjson
import requests
import requests.auth
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from iop_fhir.exchange.client import (
    USER_AGENT,
    DeliveryError,
    error_for_exception,
    is_retryable_status,
    parse_retry_after,
    where,
)

if TYPE_CHECKING:
    from iop_fhir.config import Settings

log = logging.getLogger(__name__)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# SMART allows at most five minutes; less leaves room for a partner whose clock runs behind ours.
ASSERTION_LIFETIME = 240
# A token is renewed this many seconds before the partner says it expires, so none expires in flight.
EXPIRY_MARGIN = 30
# Used when a token response omits expires_in (RFC 6749 only recommends it).
DEFAULT_EXPIRES_IN = 300

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def secret_env_var(partner_id: str, secret: str) -> str:
    """``IOP_FHIR_PARTNER_<ID>_<SECRET>``: the partner id upper-cased, anything but letters and digits as ``_``."""
    return f"IOP_FHIR_PARTNER_{re.sub(r'[^A-Za-z0-9]', '_', partner_id).upper()}_{secret}"


class BearerAuth(requests.auth.AuthBase):
    """A fixed bearer token in the Authorization header."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "BearerAuth(<token>)"


@dataclass(frozen=True)
class _Token:
    access_token: str
    renew_at: float  # clock time after which the token is fetched anew


class TokenCache:
    """Access tokens per partner, token endpoint, client and scope, shared by every client built in the process (a
    worker builds a client per delivery). One fetch at a time per key, so a burst does not ask for many tokens."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, ...], _Token] = {}
        self._locks: dict[tuple[str, ...], threading.Lock] = {}
        self._guard = threading.Lock()

    def lock(self, key: tuple[str, ...]) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def get(self, key: tuple[str, ...]) -> _Token | None:
        return self._tokens.get(key)

    def put(self, key: tuple[str, ...], token: _Token) -> None:
        self._tokens[key] = token

    def drop(self, key: tuple[str, ...], rejected: str | None = None) -> None:
        with self._guard:
            cached = self._tokens.get(key)
            # Another thread may already have replaced the rejected token with a good one.
            if cached is not None and (rejected is None or cached.access_token == rejected):
                del self._tokens[key]

    def clear(self) -> None:
        with self._guard:
            self._tokens.clear()


TOKENS = TokenCache()


class SmartBackendAuth(requests.auth.AuthBase):
    """SMART backend services: a client assertion signed with the partner-registered key (RS384 for RSA, ES384 for
    EC P-384) is exchanged at the token endpoint for an access token, sent as a bearer token until shortly before it
    expires. ``invalidate`` drops it after the FHIR server refused it (401)."""

    def __init__(
        self,
        partner_id: str,
        *,
        token_url: str,
        client_id: str,
        private_key: PrivateKey,
        key_id: str | None = None,
        scope: str | None = None,
        session: requests.Session | None = None,
        timeout: float = 10.0,
        cache: TokenCache | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.partner_id = partner_id
        self.token_url = token_url
        self.client_id = client_id
        self.algorithm = signing_algorithm(private_key, partner_id)
        self._key = private_key
        self.key_id = key_id
        self.scope = scope
        self.session = session if session is not None else requests.Session()
        self.timeout = timeout
        self.cache = cache if cache is not None else TOKENS
        self._clock = clock
        self._cache_key = (partner_id, token_url, client_id, scope or "")

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.access_token()}"
        return request

    def __repr__(self) -> str:
        return f"SmartBackendAuth({self.partner_id!r}, client_id={self.client_id!r}, alg={self.algorithm})"

    def access_token(self) -> str:
        """The cached access token, or a new one from the token endpoint."""
        with self.cache.lock(self._cache_key):
            cached = self.cache.get(self._cache_key)
            if cached is not None and self._clock() < cached.renew_at:
                return cached.access_token
            token = self._fetch()
            self.cache.put(self._cache_key, token)
            return token.access_token

    def invalidate(self, rejected: str | None = None) -> None:
        self.cache.drop(self._cache_key, rejected)

    def client_assertion(self) -> str:
        now = int(self._clock())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
            "jti": uuid.uuid4().hex,
        }
        headers = {"typ": "JWT"}
        if self.key_id:
            headers["kid"] = self.key_id
        return jwt.encode(claims, self._key, algorithm=self.algorithm, headers=headers)

    def _fetch(self) -> _Token:
        what = f"partner {self.partner_id}: token request {where('POST', self.token_url)}"
        form = {
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self.client_assertion(),
        }
        if self.scope:
            form["scope"] = self.scope
        started = time.perf_counter()
        try:
            response = self.session.post(
                self.token_url,
                data=form,
                headers={"Accept": "application/json", "User-Agent": USER_AGENT},
                timeout=(self.timeout, self.timeout),
                allow_redirects=False,
            )
        except requests.RequestException as error:
            log.debug("%s -> %s", what, type(error).__name__)
            raise error_for_exception(error, what) from error
        log.debug("%s -> %d in %.0f ms", what, response.status_code, (time.perf_counter() - started) * 1000)
        body = _json_object(response)
        if not 200 <= response.status_code < 300:
            raise _token_error(response, body, what)
        access_token = body.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise DeliveryError(f"{what} answered {response.status_code} without an access_token", retryable=False)
        token_type = body.get("token_type", "bearer")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise DeliveryError(f"{what} issued a token of type {token_type!r}, not bearer", retryable=False)
        expires_in = body.get("expires_in", DEFAULT_EXPIRES_IN)
        if isinstance(expires_in, str) and expires_in.isdigit():
            expires_in = int(expires_in)
        if not isinstance(expires_in, int | float) or isinstance(expires_in, bool):
            expires_in = DEFAULT_EXPIRES_IN
        return _Token(access_token, self._clock() + expires_in - EXPIRY_MARGIN)


def signing_algorithm(key: Any, partner_id: str) -> str:
    """RS384 for an RSA key, ES384 for an EC P-384 key: the two SMART backend services requires servers to accept."""
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS384"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if isinstance(key.curve, ec.SECP384R1):
            return "ES384"
        raise DeliveryError(
            f"partner {partner_id}: the private key is an EC key on curve {key.curve.name}; SMART backend services "
            "needs an RSA key (RS384) or an EC key on P-384 (ES384)",
            retryable=False,
        )
    raise DeliveryError(
        f"partner {partner_id}: the private key is a {type(key).__name__.lstrip('_')}; SMART backend services needs "
        "an RSA key (RS384) or an EC key on P-384 (ES384)",
        retryable=False,
    )


def load_private_key(pem: bytes, partner_id: str, source: str) -> PrivateKey:
    """The key in ``pem``; a permanent DeliveryError naming the partner and ``source`` (never the key) otherwise."""
    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The library's message is not kept: it is not needed, and nothing of the key may reach a stored error.
        raise DeliveryError(
            f"partner {partner_id}: {source} does not hold an unencrypted PEM private key", retryable=False
        ) from None
    signing_algorithm(key, partner_id)
    assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)  # signing_algorithm refused the others
    return key


def auth_for(
    partner: dict[str, Any], settings: Settings, *, session: requests.Session | None = None
) -> requests.auth.AuthBase | None:
    """The auth of a partner record, its secret read now: from ``IOP_FHIR_PARTNER_<ID>_TOKEN`` /
    ``_PRIVATE_KEY`` when set, else from the configured file (relative paths against ``settings.secrets_dir``)."""
    partner_id = str(partner["id"])
    config: dict[str, Any] = partner.get("auth") or {"type": "none"}
    auth_type = config.get("type", "none")
    if auth_type == "none":
        return None
    if auth_type == "bearer":
        token, _ = _secret(partner_id, "bearer token", config.get("token_file"), "TOKEN", settings)
        return BearerAuth(token.decode("utf-8", errors="replace").strip())
    if auth_type == "smart-backend-services":
        missing = [name for name in ("token_url", "client_id") if not config.get(name)]
        if missing:
            raise DeliveryError(
                f"partner {partner_id}: smart-backend-services auth needs {' and '.join(missing)}", retryable=False
            )
        pem, source = _secret(partner_id, "private key", config.get("private_key_file"), "PRIVATE_KEY", settings)
        return SmartBackendAuth(
            partner_id,
            token_url=config["token_url"],
            client_id=config["client_id"],
            private_key=load_private_key(pem, partner_id, source),
            key_id=config.get("key_id"),
            scope=config.get("scope"),
            session=session,
            timeout=settings.partner_timeout,
        )
    raise DeliveryError(f"partner {partner_id}: unknown auth type {auth_type!r}", retryable=False)


def _secret(
    partner_id: str, what: str, configured_file: str | None, secret: str, settings: Settings
) -> tuple[bytes, str]:
    """The secret's bytes and where they came from (a file path or an environment variable name)."""
    env_var = secret_env_var(partner_id, secret)
    from_env = os.environ.get(env_var, "")
    if from_env.strip():
        if "\n" not in from_env and "\\n" in from_env:
            from_env = from_env.replace("\\n", "\n")  # a PEM squeezed onto one line, as some deploy tools need
        return from_env.encode(), f"environment variable {env_var}"
    if not configured_file:
        raise DeliveryError(
            f"partner {partner_id}: no {what}: no file is configured and {env_var} is not set", retryable=False
        )
    path = Path(settings.secrets_dir) / configured_file
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DeliveryError(
            f"partner {partner_id}: {what} file {path} does not exist and {env_var} is not set", retryable=False
        ) from None
    except OSError as error:
        raise DeliveryError(
            f"partner {partner_id}: {what} file {path} cannot be read ({error.strerror})", retryable=False
        ) from None
    if not data.strip():
        raise DeliveryError(f"partner {partner_id}: {what} file {path} is empty", retryable=False)
    return data, f"file {path}"


def _json_object(response: requests.Response) -> dict[str, Any]:
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return {}
    return body if isinstance(body, dict) else {}


def _token_error(response: requests.Response, body: dict[str, Any], what: str) -> DeliveryError:
    # RFC 6749 §5.2: error and error_description say why (invalid_client, invalid_scope, ...); they hold no secret.
    message = f"{what} answered {response.status_code}"
    error = body.get("error")
    if isinstance(error, str):
        message += f": {error[:100]}"
        description = body.get("error_description")
        if isinstance(description, str):
            message += f" ({description[:300]})"
    return DeliveryError(
        message,
        retryable=is_retryable_status(response.status_code),
        status=response.status_code,
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
    )
