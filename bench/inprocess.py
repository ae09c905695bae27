"""What the benchmarks that drive the app in-process share: an access token for a client they register."""

from __future__ import annotations

from typing import Any


def token(app: Any, client_id: str, **registration: Any) -> str:
    """A token of ``client_id``, registered in-process first if it is not (the private key is never used: the token
    is issued directly, as `iop-fhir token` does)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from iop_fhir.security.registry import issue_for_client
    from iop_fhir.security.tokens import jwk_thumbprint, public_jwk

    registry = app.extensions["iop_fhir.clients"]
    if registry.get(client_id) is None:
        key = ec.generate_private_key(ec.SECP384R1())
        jwks = {"keys": [{**public_jwk(key), "kid": jwk_thumbprint(key), "alg": "ES384", "use": "sig"}]}
        registry.add(client_id, jwks=jwks, **registration)
    issued: str = issue_for_client(registry, app.extensions["iop_fhir.keys"], client_id, None)[0]
    return issued
