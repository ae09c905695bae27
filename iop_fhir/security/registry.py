"""The service as the authorization server of its own API (SMART Backend Services): the registered clients and the
jtis of used client assertions (kept by the store, ClientTables), the keys that sign its access tokens (table
``auth_keys``), and ``issue_for_client``, the one place that decides what a client's token says.

https://hl7.org/fhir/smart-app-launch/backend-services.html. The token endpoint (``security/views.py``) and
``iop-fhir token`` both issue through ``issue_for_client``; neither takes a partner, purpose or admin flag from the
request: those come from the registration.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from sqlalchemy import Connection, Engine, insert, select
from sqlalchemy.exc import IntegrityError

from iop_fhir.config import Settings, issuer
from iop_fhir.privacy.audit import PURPOSE_DISPLAY
from iop_fhir.security.scopes import Scope, ScopeError, Scopes
from iop_fhir.security.tokens import (
    MAX_ASSERTION_LIFETIME_S,
    TokenError,
    TokenIssuer,
    TokenVerifier,
    jwk_algorithm,
    jwk_thumbprint,
)
from iop_fhir.store import writerlock
from iop_fhir.store.base import ClientTables, RecordStore, StoredClient
from iop_fhir.store.schema import auth_keys

# https://hl7.org/fhir/R4/datatypes.html#id: a client id is used in audit records and URLs as it is.
CLIENT_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# Clocks of clients and of the service's processes drift apart; a token or assertion that is this many seconds early
# or late is still accepted.
CLOCK_SKEW_S = 30
DEFAULT_PARTNER_PURPOSE = "TREAT"
MAX_JTI_LENGTH = 255  # auth_jtis.jti
PURGE_EVERY_S = 60.0  # how often a process deletes the expired jtis
_PRIVATE_JWK_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


def _now_us() -> int:
    return int(time.time() * 1_000_000)


class ClientError(ValueError):
    """A client registration that is refused: every ``(field, message)`` wrong with it."""

    def __init__(self, issues: list[tuple[str, str]]) -> None:
        self.issues = issues
        super().__init__("; ".join(f"{field}: {message}" for field, message in issues))


class KeyRingError(ValueError):
    """The service's signing key cannot be loaded (the message names the setting, never the key)."""


GrantErrorCode = Literal["invalid_client", "invalid_scope"]


class GrantError(Exception):
    """A token that is not issued: ``error`` is the RFC 6749 §5.2 code, ``description`` says which rule refused it."""

    def __init__(self, error: GrantErrorCode, description: str) -> None:
        self.error: GrantErrorCode = error
        self.description = description
        super().__init__(f"{error}: {description}")


@dataclass(frozen=True)
class Client(StoredClient):
    """A registered client: the keys its assertions are signed with and what its tokens may say (``scope``: the most
    it may be granted)."""

    @classmethod
    def of(cls, stored: StoredClient) -> Client:
        return cls(**vars(stored))

    def summary(self) -> dict[str, Any]:
        """Everything but the keys, whose ids stand for them."""
        return {
            "client_id": self.client_id,
            "name": self.name,
            "scope": self.scope,
            "partner_id": self.partner_id,
            "purpose_of_use": self.purpose_of_use,
            "admin": self.admin,
            "consents": self.consents,
            "active": self.active,
            "kids": [k.get("kid") for k in self.jwks.get("keys", []) if isinstance(k, Mapping)],
        }


def jwks_issues(jwks: object) -> list[str]:
    """What makes ``jwks`` unusable as a client's key set: not ``{"keys": [...]}``, a private key in it, or no
    RS384/ES384 signing key at all. Keys of other kinds are allowed beside a usable one (and never used)."""
    keys = jwks.get("keys") if isinstance(jwks, Mapping) else None
    if not isinstance(keys, list):
        return ['must be a JSON Web Key Set, {"keys": [...]}']
    issues: list[str] = []
    usable = 0
    for number, jwk in enumerate(keys):
        if not isinstance(jwk, Mapping):
            issues.append(f"keys[{number}] is not a JSON object")
            continue
        private = [m for m in _PRIVATE_JWK_MEMBERS if m in jwk]
        if private:
            issues.append(f"keys[{number}] holds private key material ({', '.join(private)}); register the public key")
        elif jwk_algorithm(jwk) is not None:
            usable += 1
    if not usable and not issues:
        issues.append("has no usable signing key: an RSA key of 2048 bits or more (RS384) or an EC P-384 key (ES384)")
    return issues


class RegistryStore(ClientTables, RecordStore, Protocol):
    """What the registry keeps its clients and jtis in, and where it finds the partners a client may act for."""


class ClientRegistry:
    """The registered clients. Clients are disabled, never deleted, so a client id is never reused."""

    def __init__(self, store: RegistryStore, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock
        self._last_purge = 0.0
        self._purge_guard = threading.Lock()

    def add(
        self,
        client_id: str,
        *,
        jwks: Mapping[str, Any],
        scope: str,
        name: str | None = None,
        partner_id: str | None = None,
        purpose_of_use: str | None = None,
        admin: bool = False,
        consents: bool = False,
    ) -> Client:
        """Registers a client; ``ClientError`` naming every field that is wrong (nothing is stored then). A partner
        client's purpose of use defaults to TREAT. ``consents``: the program's consent management may write Consents
        through /fhir (a partner's client never may)."""
        issues: list[tuple[str, str]] = []
        if not isinstance(client_id, str) or not CLIENT_ID.fullmatch(client_id):
            issues.append(("client_id", "must be a FHIR id: 1 to 64 letters, digits, '-' and '.'"))
        issues.extend(("jwks", issue) for issue in jwks_issues(jwks))
        granted = ""
        try:
            parsed = Scopes.parse(scope)
        except ScopeError as error:
            issues.append(("scope", str(error)))
        else:
            if not parsed:
                issues.append(("scope", "at least one scope is needed, e.g. system/*.rs"))
            granted = str(parsed)
        if partner_id is not None:
            partner = self.store.record("partner", partner_id) if CLIENT_ID.fullmatch(partner_id) else None
            if partner is None or partner.status != "active":
                issues.append(("partner", f"no partner {partner_id!r} is registered (POST /iop/partners)"))
            elif purpose_of_use is None:
                purpose_of_use = DEFAULT_PARTNER_PURPOSE
        if purpose_of_use is not None and purpose_of_use not in PURPOSE_DISPLAY:
            known = ", ".join(PURPOSE_DISPLAY)
            issues.append(("purpose_of_use", f"{purpose_of_use!r} is not a v3-ActReason purpose of use ({known})"))
        if name is not None and not name.strip():
            issues.append(("name", "must not be blank"))
        if consents and partner_id is not None:
            issues.append(("consents", "a partner's client may never write Consents: only the program grants them"))
        if issues:
            raise ClientError(issues)
        client = Client(
            client_id=client_id,
            name=name.strip() if name else client_id,
            jwks=dict(jwks),
            scope=granted,
            partner_id=partner_id,
            purpose_of_use=purpose_of_use,
            admin=admin,
            active=True,
            created=_now_us(),
            consents=consents,
        )
        if not self.store.add_client(client):
            raise ClientError([("client_id", f"a client {client_id!r} is already registered")])
        return client

    def get(self, client_id: str) -> Client | None:
        if not isinstance(client_id, str) or not CLIENT_ID.fullmatch(client_id):
            return None
        found = self.store.client(client_id)
        return Client.of(found) if found is not None else None

    def list(self) -> list[Client]:
        return [Client.of(stored) for stored in self.store.clients()]

    def disable(self, client_id: str) -> None:
        """From now on the client gets no token (those it holds run out within the token lifetime)."""
        if not self.store.disable_client(client_id):
            raise ClientError([("client_id", f"no client {client_id!r} is registered")])

    def seen_jtis(self, client_id: str) -> UsedJtis:
        """The jtis already used by ``client_id``'s assertions; deletes the expired ones of every client now and
        then."""
        now = self._clock()
        with self._purge_guard:
            purge = now - self._last_purge >= PURGE_EVERY_S
            if purge:
                self._last_purge = now
        if purge:
            self.store.purge_jtis(int(now * 1_000_000))
        # An accepted assertion expires at most this late, so its jti is kept at least as long as it could be used.
        keep_until = int((now + MAX_ASSERTION_LIFETIME_S + 2 * CLOCK_SKEW_S) * 1_000_000)
        return UsedJtis(self.store, client_id, keep_until)


class UsedJtis:
    """``tokens.JtiStore`` over the store's jtis for one client: ``add`` is the atomic check, since another process
    may accept the same assertion between ``in`` and ``add``; the store lets only one of them keep it."""

    def __init__(self, store: ClientTables, client_id: str, keep_until_us: int) -> None:
        self._store = store
        self.client_id = client_id
        self.keep_until_us = keep_until_us

    def __contains__(self, jti: object, /) -> bool:
        if not isinstance(jti, str) or len(jti) > MAX_JTI_LENGTH:
            return False  # add refuses it
        return self._store.jti_used(self.client_id, jti)

    def add(self, jti: str, /) -> None:
        if not isinstance(jti, str) or not jti:
            raise TokenError("malformed", "jti is not a non-empty string")
        if len(jti) > MAX_JTI_LENGTH:
            raise TokenError("malformed", f"jti is longer than {MAX_JTI_LENGTH} characters")
        if not self._store.use_jti(self.client_id, jti, self.keep_until_us):
            raise TokenError("replayed", "this assertion (jti) was already used")


def covers(registered: Scopes, requested: Scope) -> bool:
    """Whether the registration allows ``requested``: each of its permission letters held by a registered scope of
    the same context for its resource type (or ``*``) whose query restrictions it keeps (it may add more)."""
    for letter in requested.permissions:
        if not any(
            scope.context == requested.context
            and scope.covers(requested.resource_type)
            and letter in scope.permissions
            and set(scope.query) <= set(requested.query)
            for scope in registered.resource_scopes
        ):
            return False
    return True


def grantable(registered: Scopes, requested: Scopes) -> Scopes:
    """The requested scopes the registration covers."""
    return Scopes(
        tuple(s for s in requested.resource_scopes if covers(registered, s)),
        tuple(s for s in requested.other_scopes if s in registered.other_scopes),
    )


def issue_for_client(
    registry: ClientRegistry, keyring: KeyRing, client_id: str, requested_scope: str | None
) -> tuple[str, str, int]:
    """(access token, granted scope, expires_in) for a registered, active client: the requested scopes its
    registration covers (all of the registration when ``requested_scope`` is None or blank); partner, purpose of use
    and admin from the registration. ``GrantError`` ``invalid_client`` or ``invalid_scope`` otherwise. The caller has
    authenticated the client (the token endpoint by its assertion; ``iop-fhir token`` by access to the database)."""
    client = registry.get(client_id)
    if client is None or not client.active:
        raise GrantError("invalid_client", "the client is not registered or is disabled")
    registered = Scopes.parse(client.scope)
    if requested_scope is None or not requested_scope.strip():
        granted = registered
    else:
        try:
            requested = Scopes.parse(requested_scope)
        except ScopeError as error:
            raise GrantError("invalid_scope", str(error)) from None
        granted = grantable(registered, requested)
        if not granted.resource_scopes:
            raise GrantError("invalid_scope", f"none of the requested scopes is within the client's ({client.scope})")
    token = keyring.issuer.issue(
        client.client_id,
        str(granted),
        partner=client.partner_id,
        purpose_of_use=client.purpose_of_use,
        admin=client.admin,
        consents=client.consents,
    )
    return token, str(granted), keyring.issuer.lifetime_s


def _generated_key_pem() -> str:
    key = ec.generate_private_key(ec.SECP384R1())
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()


class KeyRing:
    """The service's signing key (``issuer``), the public keys its tokens verify with (``verifier``), and their JWKS.
    Loaded once per process (``load``); every process on a database shares the newest key of ``auth_keys``."""

    def __init__(
        self,
        signing_pem: str,
        signing_kid: str,
        other_keys: Mapping[str, str],
        *,
        issuer_url: str,
        lifetime_s: int,
    ) -> None:
        self.issuer = TokenIssuer(signing_pem, signing_kid, issuer_url, issuer_url, lifetime_s)
        public = {signing_kid: self.issuer.public_key}
        self._jwks = [self.issuer.public_jwk()]
        for kid, pem in other_keys.items():
            if kid in public:
                continue
            retired = TokenIssuer(pem, kid, issuer_url, issuer_url, lifetime_s)
            public[kid] = retired.public_key
            self._jwks.append(retired.public_jwk())
        self.verifier = TokenVerifier(public, issuer_url, issuer_url, leeway_s=CLOCK_SKEW_S)

    def jwks(self) -> dict[str, Any]:
        """The public JWKS of ``/auth/jwks``: the signing key first."""
        return {"keys": [dict(jwk) for jwk in self._jwks]}

    @classmethod
    def load(cls, settings: Settings, engine: Engine) -> KeyRing:
        """The key of ``signing_key_file`` (relative to ``secrets_dir``, kid = its RFC 7638 thumbprint) when set;
        otherwise the newest of ``auth_keys``, generated (EC P-384) when there is none. The keys of ``auth_keys``
        verify in both cases, so tokens signed before a switch to a key file stay valid until they expire."""
        if settings.token_lifetime <= 0:
            raise KeyRingError(
                f"IOP_FHIR_TOKEN_LIFETIME must be a positive number of seconds, not {settings.token_lifetime}"
            )
        stored = _stored_keys(engine)
        if settings.signing_key_file is not None:
            signing_pem, signing_kid = _key_file(settings)
        else:
            if not stored:
                stored = _create_key(engine, stored)
            signing_kid = stored[0][0]
            signing_pem = stored[0][1]
        try:
            return cls(
                signing_pem,
                signing_kid,
                dict(stored),
                issuer_url=issuer(settings),
                lifetime_s=settings.token_lifetime,
            )
        except ValueError as error:
            raise KeyRingError(f"signing key {signing_kid!r}: {error}") from None


def _stored_keys(engine: Engine) -> list[tuple[str, str]]:
    """(kid, private PEM) of ``auth_keys``, newest first."""
    query = select(auth_keys.c.kid, auth_keys.c.private_pem).order_by(
        auth_keys.c.created.desc(), auth_keys.c.kid.desc()
    )
    with engine.connect() as conn:
        return [(row.kid, row.private_pem) for row in conn.execute(query)]


@contextmanager
def _writing(engine: Engine) -> Iterator[Connection]:
    # iop_write: BEGIN IMMEDIATE on SQLite (store/sql.py), so two writers never deadlock on a lock upgrade.
    with writerlock.writing(engine), engine.connect().execution_options(iop_write=True) as conn, conn.begin():
        yield conn


def _create_key(engine: Engine, known: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Adds a key after the ``known`` ones. Its kid follows from what the caller saw (``iop-fhir-1`` for the first),
    so processes that saw the same keys and start at once try the same kid: one insert wins, the others fail on the
    primary key and read the winner's key."""
    row = {"kid": f"iop-fhir-{len(known) + 1}", "private_pem": _generated_key_pem(), "created": _now_us()}
    with contextlib.suppress(IntegrityError), _writing(engine) as conn:  # another process stored it first
        conn.execute(insert(auth_keys).values(**row))
    stored = _stored_keys(engine)
    if not stored:
        raise KeyRingError("no signing key could be stored in auth_keys")
    return stored


def _key_file(settings: Settings) -> tuple[str, str]:
    assert settings.signing_key_file is not None
    path = Path(settings.signing_key_file)
    if not path.is_absolute():
        path = Path(settings.secrets_dir) / path
    try:
        pem = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else "not a PEM text file"
        raise KeyRingError(f"IOP_FHIR_SIGNING_KEY_FILE {path}: cannot read it ({reason})") from None
    try:
        probe = TokenIssuer(pem, "probe", "probe", "probe")
    except ValueError as error:
        raise KeyRingError(f"IOP_FHIR_SIGNING_KEY_FILE {path}: {error}") from None
    return pem, jwk_thumbprint(probe.public_key)
