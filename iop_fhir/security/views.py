"""The authorization server's HTTP surface: the token endpoint (SMART Backend Services, client_credentials with a
private_key_jwt client assertion), the service's public JWKS, and the SMART configuration of the FHIR API.

https://hl7.org/fhir/smart-app-launch/backend-services.html, https://hl7.org/fhir/smart-app-launch/conformance.html,
RFC 6749 §4.4 and §5, RFC 7523 §2.2. Token errors are RFC 6749 §5.2 JSON, not OperationOutcomes: OAuth clients read
them. Neither an answer nor a log line quotes the assertion.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request

from iop_fhir.config import Settings, auth_url
from iop_fhir.security.registry import CLOCK_SKEW_S, ClientRegistry, GrantError, KeyRing, issue_for_client
from iop_fhir.security.tokens import ALGORITHMS, TokenError, assertion_client_id, verify_client_assertion

log = logging.getLogger(__name__)

bp = Blueprint("auth", __name__)

GRANT_TYPE = "client_credentials"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FORM = "application/x-www-form-urlencoded"
TOKEN_PARAMETERS = ("grant_type", "scope", "client_assertion_type", "client_assertion", "client_id")
# No cache may keep a token answer (RFC 6749 §5.1).
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
SCOPES_SUPPORTED = ["system/*.cruds", "system/*.rs", "system/*.read", "system/*.write"]
CAPABILITIES = ["client-confidential-asymmetric", "permission-v2"]


def install(app: Flask, clients: ClientRegistry, keys: KeyRing) -> None:
    """The routes, on the client registry and the signing key (runtime.py loads both)."""
    app.extensions["iop_fhir.clients"] = clients
    app.extensions["iop_fhir.keys"] = keys
    app.register_blueprint(bp)


def fhir_base(settings: Settings) -> str:
    """The FHIR base URL: IOP_FHIR_BASE_URL, else this request's."""
    return settings.base_url.rstrip("/") or f"{request.url_root.rstrip('/')}/fhir"


class _Refused(Exception):
    def __init__(self, status: int, error: str, description: str) -> None:
        self.status = status
        self.error = error
        self.description = description


def _oauth_error(refused: _Refused) -> Response:
    response = jsonify({"error": refused.error, "error_description": refused.description})
    response.status_code = refused.status
    response.headers.update(NO_STORE)
    return response


def _form() -> dict[str, str]:
    """The token request's parameters; each must appear at most once (RFC 6749 §3.2)."""
    if request.mimetype != FORM:
        raise _Refused(400, "invalid_request", f"the token request body must be {FORM}")
    if any(name in request.args for name in TOKEN_PARAMETERS):
        # RFC 6749 §3.2: the URL may end up in logs; the assertion must not.
        raise _Refused(400, "invalid_request", "token parameters belong in the request body, not the query string")
    form: dict[str, str] = {}
    for name in TOKEN_PARAMETERS:
        values = request.form.getlist(name)
        if len(values) > 1:
            raise _Refused(400, "invalid_request", f"parameter {name} is repeated")
        if values and values[0] != "":
            form[name] = values[0]
    for name in ("grant_type", "client_assertion_type", "client_assertion", "scope"):
        if name not in form:
            raise _Refused(400, "invalid_request", f"parameter {name} is missing")
    if form["grant_type"] != GRANT_TYPE:
        raise _Refused(400, "unsupported_grant_type", f"only grant_type {GRANT_TYPE} is supported")
    return form


@bp.post("/auth/token")
def token() -> Response:
    settings: Settings = current_app.config["IOP_FHIR"]
    registry: ClientRegistry = current_app.extensions["iop_fhir.clients"]
    keyring: KeyRing = current_app.extensions["iop_fhir.keys"]
    client_id = None
    try:
        form = _form()
        if form["client_assertion_type"] != ASSERTION_TYPE:
            raise _Refused(401, "invalid_client", f"client_assertion_type must be {ASSERTION_TYPE}")
        try:
            client_id = assertion_client_id(form["client_assertion"])
        except TokenError as error:
            raise _Refused(
                401, "invalid_client", f"client assertion refused ({error.reason}): {error.detail}"
            ) from None
        if form.get("client_id", client_id) != client_id:
            raise _Refused(401, "invalid_client", "client_id is not the iss of the client assertion")
        client = registry.get(client_id)
        if client is None or not client.active:
            # Which of the two is not said, so that the endpoint does not tell which client ids exist.
            raise _Refused(401, "invalid_client", "the client is not registered or is disabled")
        try:
            verify_client_assertion(
                form["client_assertion"],
                client.jwks,
                auth_url(fhir_base(settings), "token"),
                registry.seen_jtis(client.client_id),
                client_id=client.client_id,
                leeway_s=CLOCK_SKEW_S,
            )
        except TokenError as error:
            raise _Refused(
                401, "invalid_client", f"client assertion refused ({error.reason}): {error.detail}"
            ) from None
        try:
            access_token, scope, expires_in = issue_for_client(registry, keyring, client.client_id, form["scope"])
        except GrantError as error:
            raise _Refused(401 if error.error == "invalid_client" else 400, error.error, error.description) from None
    except _Refused as refused:
        # The client id is not a secret and tells an operator whose request failed; the description holds no token.
        log.info("token refused for client %r: %s (%s)", client_id, refused.error, refused.description)
        return _oauth_error(refused)
    log.info("token issued to client %r, scope %s", client_id, scope)
    response = jsonify({"access_token": access_token, "token_type": "bearer", "expires_in": expires_in, "scope": scope})
    response.headers.update(NO_STORE)
    return response


@bp.get("/auth/jwks")
def jwks() -> Response:
    keyring: KeyRing = current_app.extensions["iop_fhir.keys"]
    response = jsonify(keyring.jwks())
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/fhir/.well-known/smart-configuration")
# Also at the host root, where some clients look first (SMART's bulk-data-client); the same document.
@bp.get("/.well-known/smart-configuration", endpoint="smart_configuration_at_root")
def smart_configuration() -> Response:
    base = fhir_base(current_app.config["IOP_FHIR"])
    configuration: dict[str, Any] = {
        "token_endpoint": auth_url(base, "token"),
        "jwks_uri": auth_url(base, "jwks"),
        "grant_types_supported": [GRANT_TYPE],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": list(ALGORITHMS),
        "scopes_supported": SCOPES_SUPPORTED,
        "capabilities": CAPABILITIES,
    }
    response = jsonify(configuration)
    response.headers["Cache-Control"] = "no-cache"
    return response
