"""HTTP hardening for every response: security headers, no caching of records, and CORS only for the origins an
operator lists (IOP_FHIR_CORS_ORIGINS); by default browsers on other origins get nothing.

https://owasp.org/www-project-secure-headers/, https://fetch.spec.whatwg.org/#http-cors-protocol
"""

from __future__ import annotations

from flask import Flask, Response, request

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}
# Records are PHI: no shared or browser cache may keep them. The CapabilityStatement is public and may be revalidated.
NO_STORE = "no-store"
PUBLIC_PATHS = ("/fhir/metadata", "/health")
CORS_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
CORS_ALLOWED_HEADERS = "Authorization, Content-Type, Accept, If-Match, If-None-Match, If-None-Exist, Prefer"
CORS_EXPOSED_HEADERS = "ETag, Location, Last-Modified, Content-Location"


def allowed_origins(setting: str) -> frozenset[str]:
    """The origins of IOP_FHIR_CORS_ORIGINS (comma-separated, exact scheme://host[:port]); empty = CORS off."""
    return frozenset(o.strip().rstrip("/") for o in setting.split(",") if o.strip())


def install(app: Flask, cors_origins: str) -> None:
    origins = allowed_origins(cors_origins)

    @app.after_request
    def _harden(response: Response) -> Response:
        present = {name.lower() for name in response.headers.keys()}
        for name, value in SECURITY_HEADERS.items():
            if name.lower() not in present:
                response.headers.add(name, value)
        if "cache-control" not in present:
            response.headers["Cache-Control"] = "no-cache" if request.path in PUBLIC_PATHS else NO_STORE
        origin = request.headers.get("Origin")
        if origin and origin in origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED_HEADERS
            if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
                response.headers["Access-Control-Allow-Methods"] = CORS_METHODS
                response.headers["Access-Control-Allow-Headers"] = CORS_ALLOWED_HEADERS
                response.headers["Access-Control-Max-Age"] = "600"
        if origins:
            response.headers.add("Vary", "Origin")
        return response
