"""Access tokens for tests: every test client sends one (the program's own integration client with system/*.cruds,
not an administrator, unless a test gives another), minted through the service's own client registry and signing key,
as `iop-fhir token` does."""

from __future__ import annotations

import uuid
from functools import cache
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask
from flask.testing import FlaskClient
from jwt.algorithms import ECAlgorithm
from werkzeug.datastructures import Headers

from iop_fhir.security.registry import ClientError, issue_for_client

ADMIN_SCOPE = "system/*.cruds"


@cache
def client_jwks() -> dict[str, Any]:
    """A JWKS with one ES384 public key: tests mint tokens directly, so the private half is never used."""
    key = ec.generate_private_key(ec.SECP384R1())
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {"keys": [{**jwk, "kid": "test-key", "alg": "ES384", "use": "sig"}]}


def mint(
    app: Flask,
    scope: str = ADMIN_SCOPE,
    *,
    partner: str | None = None,
    purpose: str | None = None,
    admin: bool = False,
    consents: bool = False,
    client_id: str | None = None,
) -> str:
    """An access token of a newly registered client (or of ``client_id`` if it is registered already);
    ``consents``: registered with the consent-management permission (a program client that may write Consents
    through /fhir)."""
    registry = app.extensions["iop_fhir.clients"]
    client_id = client_id or f"test-{uuid.uuid4().hex[:12]}"
    if registry.get(client_id) is None:
        # Passed only when asked for, so that every other registration is the one it always was.
        extra: dict[str, Any] = {"consents": True} if consents else {}
        try:
            registry.add(
                client_id,
                jwks=client_jwks(),
                scope=scope,
                partner_id=partner,
                purpose_of_use=purpose,
                admin=admin,
                **extra,
            )
        except ClientError:
            if registry.get(client_id) is None:  # not another process registering the same client at once
                raise
    token: str = issue_for_client(registry, app.extensions["iop_fhir.keys"], client_id, scope)[0]
    return token


def program_token(app: Flask) -> str:
    """One token per app of the program's own client, system/*.cruds and the consent-management permission (it
    records consents through /fhir as the program's systems do), registered on first use."""
    token: str | None = app.extensions.get("tests.program_token")
    if token is None:
        token = mint(app, ADMIN_SCOPE, client_id="test-program", consents=True)
        app.extensions["tests.program_token"] = token
    return token


def admin_token(app: Flask) -> str:
    """An administrator's token, system/*.cruds."""
    return mint(app, ADMIN_SCOPE, admin=True, client_id="test-admin")


class TokenClient(FlaskClient):
    """A test client that sends ``token`` (by default the program client's token) unless the request sets its
    own Authorization header; ``anonymous = True`` sends none."""

    token: str | None = None
    anonymous: bool = False

    def open(self, *args: Any, **kwargs: Any) -> Any:
        if not self.anonymous:
            headers = Headers(kwargs.pop("headers", None) or {})
            if "Authorization" not in headers:
                headers["Authorization"] = f"Bearer {self.token or program_token(self.application)}"
            kwargs["headers"] = headers
        return super().open(*args, **kwargs)
