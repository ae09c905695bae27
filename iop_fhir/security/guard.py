"""Wires security into the app: every request but the public ones needs a valid bearer token (401 with
WWW-Authenticate otherwise, RFC 6750), /iop routes are checked against the token's scopes, and every authenticated
request leaves its audit trail (privacy/trail.py): its rows go to the audit log (privacy/auditlog.py, the app's
``iop_fhir.audit``) once the response is ready, committed before it is released for a partner's client. The FHIR
interactions check their own scopes through the request's repository (Repository.acting_for), which notes in the trail
what it returns.

Only bench/run.py's comparison server sets ``iop_fhir.audit`` to None (the audit switched off, to measure what it
costs); no setting or environment variable can."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from flask import Flask, Response, current_app, g, request

from iop_fhir.errors import Unauthorized
from iop_fhir.fhir.repository import Repository
from iop_fhir.privacy import disclosure, trail
from iop_fhir.privacy.auditlog import AuditWriter
from iop_fhir.security.access import Access, Principal
from iop_fhir.security.tokens import TokenError

log = logging.getLogger("iop_fhir.security")

# Open to anyone: discovery (CapabilityStatement, SMART configuration, the service's public keys), getting a token,
# the health check and the API documentation.
PUBLIC_PATHS = frozenset(
    {
        "/fhir/metadata",
        "/fhir/.well-known/smart-configuration",
        "/.well-known/smart-configuration",
        "/auth/token",
        "/auth/jwks",
        "/health",
    }
)
PUBLIC_PREFIXES = ("/docs", "/openapi")
# The views those paths route to; the same path with another method routes elsewhere (DELETE /fhir/metadata is a
# FHIR delete of type "metadata") and needs a token like any other request.
PUBLIC_ENDPOINTS = frozenset(
    {
        "fhir.metadata",
        "auth.smart_configuration",
        "auth.smart_configuration_at_root",
        "auth.token",
        "auth.jwks",
        "health",
    }
)
REALM = 'Bearer realm="iop-fhir"'

# Flask endpoint → the audit action of the request (audit.ACTIONS); endpoints not listed are audited by prefix.
_FHIR_ACTIONS = {
    "fhir.read": "read",
    "fhir.vread": "vread",
    "fhir.search": "search",
    "fhir.search_post": "search",
    "fhir.compartment_search": "search",
    "fhir.system_history": "history",
    "fhir.type_history": "history",
    "fhir.instance_history": "history",
    "fhir.create": "create",
    "fhir.update": "update",
    "fhir.conditional_update": "update",
    "fhir.patch": "patch",
    "fhir.conditional_patch": "patch",
    "fhir.delete": "delete",
    "fhir.conditional_delete": "delete",
    "fhir.batch_or_transaction": "transaction",
    "export.export_system": "export",
    "export.export_patients": "export",
    "export.export_group": "export",
    # $validate, $evaluate-measure, and polling or cancelling an export: operations, audited with their path as the
    # query.
    "fhir.validate": "operation",
    "measures.evaluate_measure": "operation",
    "export.export_status": "operation",
    "export.export_cancel": "operation",
    # A file of an export leaving the service: its job's row names every resource it exported (fhir/export.py);
    # each download is audited too, with its path (job and file number).
    "export.export_file": "export",
}
# Requests audited with their path and query string (no resource names them).
_QUERIED = frozenset(
    {"fhir.validate", "measures.evaluate_measure", "export.export_status", "export.export_cancel", "export.export_file"}
)
_NOT_AUDITED: frozenset[str] = frozenset()


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _public_request() -> bool:
    """A request to a public view, or one to a public path that routes nowhere (answered 404 or 405)."""
    endpoint = request.endpoint
    if endpoint is None:
        return is_public(request.path)
    return endpoint in PUBLIC_ENDPOINTS or endpoint.startswith("openapi.")


def principal() -> Principal:
    found: Principal = g.iop_principal
    return found


def access() -> Access:
    found: Access = g.iop_access
    return found


def repository() -> Repository:
    """The repository as the request's client sees it."""
    if "iop_repository" not in g:
        base: Repository = current_app.extensions["iop_fhir.repository"]
        view = base.acting_for(access())
        current = g.get("iop_trail")
        g.iop_repository = trail.observed(view, current) if current is not None else view
    found: Repository = g.iop_repository
    return found


def audited(references: list[str]) -> None:
    """Note in the request's audit trail resources it returns that no repository call did (the audit log's own
    AuditEvents)."""
    current = g.get("iop_trail")
    if current is not None:
        current.saw_references(references)


def install(app: Flask) -> None:
    app.extensions["iop_fhir.verified_tokens"] = VerifiedTokens()

    @app.before_request
    def _authenticate() -> None:
        if _public_request() or _preflight():
            return
        claims = _verify(_bearer())
        found = Principal.from_claims(claims)
        g.iop_principal = found
        g.iop_access = Access(found, app.extensions["iop_fhir.store"])
        action = _action(request.endpoint, request.method)
        if action is not None and app.extensions["iop_fhir.audit"] is not None:
            # As received; a query string that is not UTF-8 is refused by the FHIR API, and kept here as it decodes.
            queried = action == "search" or request.endpoint in _QUERIED
            query = f"{request.path}?{request.query_string.decode('utf-8', 'replace')}" if queried else None
            g.iop_trail = trail.Trail(found, action, query=query)
            g.iop_trail_token = trail.begin(g.iop_trail)
        endpoint = request.endpoint or ""
        if endpoint.split(".", 1)[0] in ("iop", "deliveries", "referrals"):
            access().require_iop(endpoint)

    @app.after_request
    def _audit(response: Response) -> Response:
        found = g.get("iop_principal")
        if found is not None and found.partner is not None and response.status_code < 400 and response.is_json:
            response.set_data(disclosure.mark_disclosed(response.get_data()))
        current = g.get("iop_trail")
        if current is not None and response.status_code != 401:
            g.iop_trail = None
            audit_log: AuditWriter = app.extensions["iop_fhir.audit"]
            rows = current.rows(response.status_code, _target())
            if current.durable:
                # A partner's disclosure (or probe) is in the database before a byte of the response leaves; if it
                # cannot be, the client gets a 500 instead of unaudited data.
                audit_log.append_durable(rows)
            else:
                audit_log.append(rows)
        return response

    @app.teardown_request
    def _end_trail(_error: BaseException | None) -> None:
        token = g.pop("iop_trail_token", None)
        if token is not None:
            trail.end(token)


def _preflight() -> bool:
    return request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers


def _bearer() -> str:
    header = request.headers.get("Authorization")
    if not header:
        raise Unauthorized(
            "this request needs an access token: Authorization: Bearer <token> (see POST /auth/token)",
            "Authorization",
            headers={"WWW-Authenticate": REALM},
        )
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _invalid("the Authorization header must be 'Bearer <token>'")
    return token.strip()


class VerifiedTokens:
    """Claims of tokens already verified, by the token's exact text, until they expire: a client sends the same token
    with every request for its lifetime, and checking its signature each time would be most of a read's cost."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._claims: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, token: str, now: float) -> Any:
        with self._lock:
            claims = self._claims.get(token)
            if claims is None:
                return None
            if claims.expires_at <= now:
                del self._claims[token]
                return None
            self._claims.move_to_end(token)
            return claims

    def put(self, token: str, claims: Any) -> None:
        with self._lock:
            self._claims[token] = claims
            while len(self._claims) > self.size:
                self._claims.popitem(last=False)


def _verify(token: str) -> Any:
    verifier = current_app.extensions["iop_fhir.keys"].verifier
    cache: VerifiedTokens = current_app.extensions["iop_fhir.verified_tokens"]
    now = time.time()
    claims = cache.get(token, now)
    if claims is not None:
        return claims
    try:
        claims = verifier.verify(token)
        cache.put(token, claims)
        return claims
    except TokenError as error:
        # The reason names the rule (expired, bad-signature, ...); neither the token nor its claims are logged.
        log.info("refused access token: %s", error.reason)
        raise _invalid(f"the access token is not valid: {error.detail}") from None


def _invalid(description: str) -> Unauthorized:
    quoted = description.replace("\\", "").replace('"', "'")
    challenge = f'{REALM}, error="invalid_token", error_description="{quoted}"'
    return Unauthorized(description, "Authorization", headers={"WWW-Authenticate": challenge})


def _action(endpoint: str | None, method: str) -> str | None:
    if endpoint is None or endpoint in _NOT_AUDITED:
        return None
    if endpoint in _FHIR_ACTIONS:
        return _FHIR_ACTIONS[endpoint]
    if endpoint.startswith("fhir."):
        return None
    if method in ("GET", "HEAD"):
        name = endpoint.split(".", 1)[1] if "." in endpoint else endpoint
        return "search" if name.startswith("list") or name == "disclosures" else "read"
    return "create" if ".create_" in endpoint else "update"


def _target() -> str | None:
    """The Type/id a FHIR instance URL names, for the audit of a refused request."""
    args = request.view_args or {}
    if "res_type" in args and "res_id" in args:
        return f"{args['res_type']}/{args['res_id']}"
    return None
