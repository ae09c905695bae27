"""The service's own access tokens (signed JWTs, RFC 9068) and the SMART Backend Services client assertions exchanged
for them (RFC 7523). Pure: keys are passed in; nothing is read from files, the database or the network.

https://hl7.org/fhir/smart-app-launch/backend-services.html. Only RS384 and ES384 are accepted, so a token whose header
asks for ``none`` or an HMAC algorithm (HS256 keyed with the public key: the HS/RS confusion) is refused before any
key is used. A ``TokenError`` says which rule refused a token (``reason``) and why (``detail``); neither holds a secret.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from iop_fhir.security.scopes import ScopeError, Scopes

ALGORITHMS = ("RS384", "ES384")
ACCESS_TOKEN_TYPE = "at+jwt"  # RFC 9068 §2.1: tells an access token apart from other JWTs signed with the same key
# SMART: a client assertion's exp is "no more than five minutes in the future".
MAX_ASSERTION_LIFETIME_S = 300
MIN_RSA_BITS = 2048
ADMIN_CLAIM = "iop_admin"  # private claim: the token's client may use the operator endpoints
CONSENTS_CLAIM = "iop_consents"  # private claim: the token's client may write Consents (the program's consent desk)

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
# A verifying key: PEM text, a cryptography key (a private key stands for its public half) or a JWK.
KeyMaterial = str | bytes | PublicKey | PrivateKey | Mapping[str, Any]

Reason = Literal[
    "malformed",  # not a compact JWS, undecodable header or payload, a claim of the wrong type
    "alg-none",  # unsigned
    "alg-not-allowed",  # an algorithm other than RS384/ES384, or not the one of the key named by kid
    "unknown-kid",  # no key of that id (or no kid and no single key to use)
    "bad-signature",
    "expired",
    "not-yet-valid",  # nbf or iat in the future
    "wrong-audience",
    "wrong-issuer",
    "wrong-type",  # an access token whose typ is not at+jwt
    "wrong-subject",  # a client assertion whose sub is not its iss
    "missing-claim",
    "missing-scope",
    "invalid-scope",
    "lifetime-too-long",  # a client assertion valid for more than five minutes
    "replayed",  # a client assertion whose jti was already used
]


class TokenError(Exception):
    """A token or client assertion that is refused: ``reason`` names the rule, ``detail`` explains it."""

    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason: Reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class JtiStore(Protocol):
    """The jti values already used, kept by the caller (a set, or a table with a unique key)."""

    def __contains__(self, jti: object, /) -> bool: ...

    def add(self, jti: str, /) -> None: ...


@dataclass(frozen=True)
class Claims:
    """What a verified access token says: which client, with which scopes, for which partner and purpose."""

    client_id: str
    scopes: Scopes
    partner: str | None
    purpose_of_use: str | None  # a v3-ActReason code such as TREAT
    jti: str
    issued_at: int
    expires_at: int
    admin: bool = False  # the client may use the operator endpoints (claim iop_admin)
    consents: bool = False  # the client may write Consents through /fhir (claim iop_consents)


@dataclass(frozen=True)
class ClientAssertion:
    """A verified client assertion. ``expires_at`` tells the caller how long its jti must stay in the seen set."""

    client_id: str
    jti: str
    expires_at: int


class TokenIssuer:
    """Signs the service's access tokens: RS384 with an RSA key, ES384 with an EC P-384 key."""

    def __init__(
        self,
        private_key_pem: str | bytes,
        key_id: str,
        issuer: str,
        audience: str,
        lifetime_s: int = 300,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if lifetime_s <= 0:
            raise ValueError(f"an access token lifetime must be positive, not {lifetime_s}")
        if not key_id:
            raise ValueError("a signing key needs a key id (kid), so that verifiers can pick its public key")
        pem = private_key_pem.encode() if isinstance(private_key_pem, str) else private_key_pem
        try:
            key = load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            # The library's message is dropped: nothing of the key may reach a log or an error.
            raise ValueError("the signing key is not an unencrypted PEM private key") from None
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ValueError(f"the signing key is a {_key_kind(key)}; it must be RSA or EC P-384")
        self.algorithm = _algorithm(key.public_key())
        self._key = key
        self.key_id = key_id
        self.issuer = issuer
        self.audience = audience
        self.lifetime_s = lifetime_s
        self._clock = clock

    @property
    def public_key(self) -> PublicKey:
        return self._key.public_key()

    def public_jwk(self) -> dict[str, Any]:
        """The public key as a JWK (with kid, alg and use), for the service's JWKS."""
        jwk = _to_jwk(self.public_key)
        return {**jwk, "kid": self.key_id, "alg": self.algorithm, "use": "sig"}

    def issue(
        self,
        client_id: str,
        scopes: str | Iterable[str],
        partner: str | None = None,
        purpose_of_use: str | None = None,
        admin: bool = False,
        consents: bool = False,
    ) -> str:
        """A signed access token for ``client_id``. ``scopes`` (a scope string or its items) must parse
        (``ScopeError`` otherwise) and must not be empty: a token without scopes would be refused anyway.
        ``admin`` adds the claim ``iop_admin: true``, ``consents`` ``iop_consents: true``."""
        if not client_id:
            raise ValueError("an access token needs a client id")
        granted = Scopes.parse(scopes)
        if not granted:
            raise ValueError("an access token needs at least one scope")
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": client_id,
            "aud": self.audience,
            "client_id": client_id,
            "scope": str(granted),
            "iat": now,
            "nbf": now,
            "exp": now + self.lifetime_s,
            "jti": uuid.uuid4().hex,
        }
        if partner is not None:
            claims["partner"] = partner
        if purpose_of_use is not None:
            claims["purpose_of_use"] = purpose_of_use
        if admin:
            claims[ADMIN_CLAIM] = True
        if consents:
            claims[CONSENTS_CLAIM] = True
        headers = {"kid": self.key_id, "typ": ACCESS_TOKEN_TYPE}
        return jwt.encode(claims, self._key, algorithm=self.algorithm, headers=headers)


class TokenVerifier:
    """Checks the service's access tokens against its public keys (by kid), issuer and audience."""

    def __init__(self, public_keys: Mapping[str, KeyMaterial], issuer: str, audience: str, leeway_s: float = 0) -> None:
        if not public_keys:
            raise ValueError("a verifier needs at least one public key")
        self._keys: dict[str, tuple[PublicKey, str]] = {}
        for kid, material in public_keys.items():
            key = _verifying_key(material)
            if key is None:
                raise ValueError(f"key {kid!r} is not an RSA key of {MIN_RSA_BITS} bits or more, nor an EC P-384 key")
            self._keys[kid] = (key, _algorithm(key))
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = leeway_s

    def verify(self, token: str) -> Claims:
        """The claims of a valid access token; ``TokenError`` naming the first rule it breaks otherwise."""
        header = _checked_header(token)
        kid = header.get("kid")
        if not isinstance(kid, str) or kid not in self._keys:
            raise TokenError("unknown-kid", "the token names no key of this service" if kid else "the token has no kid")
        key, algorithm = self._keys[kid]
        if header["alg"] != algorithm:
            raise TokenError("alg-not-allowed", f"key {kid!r} signs with {algorithm}, the token says {header['alg']}")
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in (ACCESS_TOKEN_TYPE, f"application/{ACCESS_TOKEN_TYPE}"):
            raise TokenError("wrong-type", f"an access token has typ {ACCESS_TOKEN_TYPE}, not {typ!r}")
        payload = _decode(
            token,
            key,
            algorithm,
            audience=self.audience,
            issuer=self.issuer,
            leeway_s=self.leeway_s,
            require=["iss", "sub", "aud", "exp", "iat", "jti"],
        )
        scope = payload.get("scope")
        if scope is None or scope == "":
            raise TokenError("missing-scope", "the token has no scope claim")
        if not isinstance(scope, str):
            raise TokenError("invalid-scope", "the scope claim is not a space-separated string")
        try:
            scopes = Scopes.parse(scope)
        except ScopeError as error:
            raise TokenError("invalid-scope", str(error)) from None
        client_id = payload["sub"]
        if payload.get("client_id", client_id) != client_id:
            raise TokenError("malformed", "client_id and sub name different clients")
        for name in ("partner", "purpose_of_use"):
            if payload.get(name) is not None and not isinstance(payload[name], str):
                raise TokenError("malformed", f"{name} is not a string")
        admin = payload.get(ADMIN_CLAIM, False)
        consents = payload.get(CONSENTS_CLAIM, False)
        for claim, value in ((ADMIN_CLAIM, admin), (CONSENTS_CLAIM, consents)):
            if not isinstance(value, bool):
                raise TokenError("malformed", f"{claim} is not a boolean")
        return Claims(
            client_id=client_id,
            scopes=scopes,
            partner=payload.get("partner"),
            purpose_of_use=payload.get("purpose_of_use"),
            jti=payload["jti"],
            issued_at=int(payload["iat"]),
            expires_at=int(payload["exp"]),
            admin=admin,
            consents=consents and payload.get("partner") is None,
        )


def assertion_client_id(assertion: str) -> str:
    """The unverified ``iss`` of a client assertion: which client's JWKS to verify it with. Trust nothing else
    from it before ``verify_client_assertion``."""
    _checked_header(assertion)
    try:
        payload = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise TokenError("malformed", "the payload is not a JSON object") from None
    iss = payload.get("iss")
    if not isinstance(iss, str) or not iss:
        raise TokenError("missing-claim", "the assertion has no iss (the client id)")
    return iss


def verify_client_assertion(
    assertion: str,
    client_jwks: Mapping[str, Any],
    token_url: str,
    seen_jti: JtiStore,
    *,
    client_id: str | None = None,
    leeway_s: float = 0,
) -> ClientAssertion:
    """A SMART Backend Services client assertion (``client_assertion`` of a token request): signed RS384 or ES384 by
    a key of ``client_jwks`` (``{"keys": [...]}``; picked by kid, or the only key for the algorithm when the header
    has none), ``iss`` = ``sub`` = the client id (= ``client_id`` when given), ``aud`` = ``token_url``, ``exp`` no
    more than five minutes ahead, ``jti`` not in ``seen_jti``. The jti is added to ``seen_jti`` once every other
    check passed; making check-and-add atomic across processes is the store's job (a unique key)."""
    header = _checked_header(assertion)
    algorithm = header["alg"]
    key = _client_key(client_jwks, header.get("kid"), algorithm)
    payload = _decode(
        assertion,
        key,
        algorithm,
        audience=token_url,
        issuer=client_id,
        leeway_s=leeway_s,
        require=["iss", "sub", "aud", "exp", "jti"],
    )
    if not isinstance(payload["iss"], str) or payload["sub"] != payload["iss"]:
        raise TokenError("wrong-subject", "sub and iss must both be the client id")
    expires_at = payload["exp"]
    if not isinstance(expires_at, int | float):
        raise TokenError("malformed", "exp is not a number")
    if expires_at > time.time() + MAX_ASSERTION_LIFETIME_S + leeway_s:
        raise TokenError("lifetime-too-long", f"exp is more than {MAX_ASSERTION_LIFETIME_S} seconds ahead")
    jti = payload["jti"]
    if jti in seen_jti:
        raise TokenError("replayed", "this assertion (jti) was already used")
    seen_jti.add(jti)
    return ClientAssertion(client_id=payload["iss"], jti=jti, expires_at=int(expires_at))


def jwk_algorithm(jwk: Mapping[str, Any]) -> str | None:
    """The algorithm (RS384 or ES384) a client's signing JWK verifies assertions with; None when it verifies none
    (another key type or curve, an RSA key under MIN_RSA_BITS, ``use`` other than sig, an ``alg`` it cannot have)."""
    if not isinstance(jwk, Mapping) or jwk.get("use", "sig") != "sig":
        return None
    key = _verifying_key(jwk)
    if key is None:
        return None
    algorithm = _algorithm(key)
    return algorithm if jwk.get("alg", algorithm) == algorithm else None


def jwk_thumbprint(key: PublicKey | PrivateKey) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public key (of a private key's public half): a stable key id."""
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) else key
    jwk = _to_jwk(public)
    members = ("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def public_jwk(key: PublicKey | PrivateKey) -> dict[str, Any]:
    """The public JWK (kty and key members only) of a key, or of a private key's public half."""
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) else key
    return _to_jwk(public)


def _checked_header(token: object) -> dict[str, Any]:
    """The header of a compact JWS whose algorithm is allowed; nothing is verified yet."""
    if not isinstance(token, str) or token.count(".") != 2:
        raise TokenError("malformed", "not a compact JWS (three base64url parts joined by '.')")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise TokenError("malformed", "the header is not base64url-encoded JSON") from None
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise TokenError("malformed", "the header has no alg")
    if alg.lower() == "none":
        raise TokenError("alg-none", "unsigned tokens (alg none) are refused")
    if alg not in ALGORITHMS:
        raise TokenError("alg-not-allowed", f"alg {alg} is refused; allowed: {', '.join(ALGORITHMS)}")
    return header


def _decode(
    token: str,
    key: PublicKey,
    algorithm: str,
    *,
    audience: str,
    issuer: str | None,
    leeway_s: float,
    require: list[str],
) -> dict[str, Any]:
    """The payload once the signature and the registered claims hold; PyJWT's errors become ``TokenError``s."""
    try:
        payload: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            audience=audience,
            issuer=issuer,
            leeway=leeway_s,
            options={"require": require, "verify_iss": issuer is not None, "enforce_minimum_key_length": True},
        )
    except jwt.InvalidSignatureError:
        raise TokenError("bad-signature", "the signature does not verify with the key named by kid") from None
    except jwt.ExpiredSignatureError:
        raise TokenError("expired", "the token has expired (exp)") from None
    except jwt.ImmatureSignatureError as error:
        raise TokenError("not-yet-valid", f"the token is not valid yet ({_claim_of(error)})") from None
    except jwt.InvalidAudienceError:
        raise TokenError("wrong-audience", f"the token is not for {audience}") from None
    except jwt.InvalidIssuerError:
        raise TokenError("wrong-issuer", f"the token was not issued by {issuer}") from None
    except jwt.MissingRequiredClaimError as error:
        raise TokenError("missing-claim", f"the token has no {error.claim} claim") from None
    except jwt.InvalidAlgorithmError:
        raise TokenError("alg-not-allowed", f"the token is not signed with {algorithm}") from None
    except jwt.PyJWTError as error:
        # DecodeError, InvalidIssuedAtError, InvalidSubjectError, InvalidJTIError, ...: claims of the wrong shape.
        raise TokenError("malformed", str(error)) from None
    return payload


def _claim_of(error: Exception) -> str:
    return "iat" if "(iat)" in str(error) else "nbf"


def _client_key(client_jwks: Mapping[str, Any], kid: object, algorithm: str) -> PublicKey:
    """The key of the client's JWKS that must have signed an assertion with this kid and alg."""
    candidates: list[tuple[Mapping[str, Any], PublicKey]] = []
    entries = client_jwks.get("keys") if isinstance(client_jwks, Mapping) else None
    for jwk in entries if isinstance(entries, list) else []:
        if not isinstance(jwk, Mapping) or jwk.get("use", "sig") != "sig":
            continue
        if kid is not None and jwk.get("kid") != kid:
            continue
        key = _verifying_key(jwk)
        if key is not None:
            candidates.append((jwk, key))
    if kid is not None:
        if not candidates:
            raise TokenError("unknown-kid", f"the client's JWKS has no usable signing key with kid {kid!r}")
        # A JWKS may list one kid for several keys (during a rotation, say): the one for the header's alg signs.
        jwk, key = next(((j, k) for j, k in candidates if _algorithm(k) == algorithm), candidates[0])
    else:
        of_alg = [(jwk, key) for jwk, key in candidates if _algorithm(key) == algorithm]
        if len(of_alg) != 1:
            raise TokenError("unknown-kid", f"no kid, and the client's JWKS has {len(of_alg)} {algorithm} keys")
        jwk, key = of_alg[0]
    if _algorithm(key) != algorithm or jwk.get("alg", algorithm) != algorithm:
        raise TokenError("alg-not-allowed", f"key {kid!r} of the client signs with {_algorithm(key)}, not {algorithm}")
    return key


def _verifying_key(material: KeyMaterial) -> PublicKey | None:
    """The public key in ``material`` when it is RSA (at least MIN_RSA_BITS) or EC P-384; None otherwise."""
    key: object
    try:
        if isinstance(material, Mapping):
            kty = material.get("kty")
            if kty == "RSA":
                key = RSAAlgorithm.from_jwk(dict(material))
            elif kty == "EC":
                key = ECAlgorithm.from_jwk(dict(material))
            else:
                return None
        elif isinstance(material, str | bytes):
            pem = material.encode() if isinstance(material, str) else material
            key = load_pem_public_key(pem) if b"PRIVATE KEY" not in pem else load_pem_private_key(pem, password=None)
        else:
            key = material
    except (ValueError, TypeError, UnsupportedAlgorithm, jwt.PyJWTError):
        return None
    if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        key = key.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= MIN_RSA_BITS:
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1):
        return key
    return None


def _algorithm(key: PublicKey) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"an RSA key needs at least {MIN_RSA_BITS} bits, this one has {key.key_size}")
        return "RS384"
    if isinstance(key.curve, ec.SECP384R1):
        return "ES384"
    raise ValueError(f"an EC key must be on P-384 (ES384), not {key.curve.name}")


def _to_jwk(key: PublicKey) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPublicKey):
        return RSAAlgorithm.to_jwk(key, as_dict=True)
    return ECAlgorithm.to_jwk(key, as_dict=True)


def _key_kind(key: object) -> str:
    return type(key).__name__.lstrip("_")
