"""Settings, read from IOP_FHIR_* environment variables; the defaults run with nothing else installed."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import iop_fhir

REPO = Path(iop_fhir.__file__).resolve().parents[1]


@dataclass(frozen=True)
class Settings:
    database_url: str = "sqlite:///iop_fhir.db"
    base_url: str = ""  # public base of the FHIR API, e.g. https://iop.example.org/fhir; empty = from the request
    max_body_bytes: int = 10 * 1024 * 1024
    default_page_size: int = 20
    max_page_size: int = 1000
    # Bounds the time one batch or transaction holds a worker: 5000 conditional creates take about 23 s on a busy
    # 2-core machine on SQLite, under a quarter of gunicorn's 120 s worker timeout (cli.py); 413 above it.
    max_bundle_entries: int = 5000
    sql_echo: bool = False
    mappings_dir: Path = REPO / "mappings"
    profiles_dir: Path = REPO / "profiles"
    seed_conformance: bool = True
    partner_timeout: float = 10.0  # seconds, to connect and then between bytes, for every call to a partner
    secrets_dir: Path = Path(".")  # relative token and key file paths of partners resolve against it
    outbox_max_attempts: int = 8  # a delivery failing this many times is dead (kept, retried only by hand)
    worker_lease_seconds: int = 60  # how long a worker holds a claimed delivery before another may take it
    cors_origins: str = ""  # comma-separated browser origins allowed to call the API; empty = CORS off
    signing_key_file: Path | None = None  # PEM private key signing access tokens; None = one kept in the database
    token_lifetime: int = 300  # seconds an access token of this service is valid
    auth_issuer: str = ""  # iss and aud of this service's access tokens; empty = see issuer()
    export_file_lines: int = 50_000  # most resources in one NDJSON file of a Bulk Data export
    export_retention: int = 86_400  # seconds a finished export job and its files are kept
    audit_flush_ms: float = 10.0  # the longest a read's audit row waits for its group commit
    audit_flush_rows: int = 256  # audit rows committed in one transaction at most
    transition_overdue_days: int = 7  # days a transition may wait for the partner's acceptance before it is overdue

    @property
    def terminology_dir(self) -> Path:
        return Path(self.mappings_dir) / "terminology"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        environ = dict(os.environ) if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(f"IOP_FHIR_{f.name.upper()}")
            if raw is None:
                continue
            if f.type in ("int", int):
                values[f.name] = int(raw)
            elif f.type in ("float", float):
                values[f.name] = float(raw)
            elif f.type in ("bool", bool):
                values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif f.type in ("Path", Path):
                values[f.name] = Path(raw)
            elif f.type == "Path | None":
                values[f.name] = Path(raw) if raw.strip() else None
            else:
                values[f.name] = raw
        return replace(cls(**values), **overrides)


def issuer(settings: Settings) -> str:
    """The ``iss`` and ``aud`` of the service's access tokens: IOP_FHIR_AUTH_ISSUER, else IOP_FHIR_BASE_URL, else a
    fixed URN. The app and ``iop-fhir token`` both use this, so a token minted by one verifies in the other."""
    return settings.auth_issuer or settings.base_url.rstrip("/") or "urn:iop-fhir"


def auth_url(fhir_base: str, endpoint: str) -> str:
    """The absolute URL of an /auth endpoint (``token``, ``jwks``) of the server whose FHIR base is ``fhir_base``:
    its trailing ``/fhir`` becomes ``/auth/<endpoint>``."""
    base = fhir_base.rstrip("/")
    if base.endswith("/fhir"):
        base = base[: -len("/fhir")]
    return f"{base}/auth/{endpoint}"


# The configuration table in README.md is the user-facing copy of this.
DESCRIPTIONS = {
    "database_url": "SQLAlchemy URL; `postgresql+psycopg://host/db` for PostgreSQL",
    "base_url": "public base URL of the FHIR API used in links and Location headers; empty: taken from the request",
    "max_body_bytes": "largest request body accepted (413 above it)",
    "default_page_size": "search page size when `_count` is not given",
    "max_page_size": "largest `_count` honoured",
    "max_bundle_entries": "most entries accepted in one batch or transaction Bundle; a larger one is refused with 413 "
    "(OperationOutcome `too-costly` at `Bundle.entry`) and must be split. It bounds how long one request holds a "
    "worker: 5000 entries take a few seconds (creates) to about 25 s (conditional creates) on 2 cores",
    "sql_echo": "log SQL statements (never enable with real data: parameters are logged)",
    "mappings_dir": "the mapping specs; its `terminology/` folder holds the CodeSystems, ValueSets and ConceptMaps, "
    "served at `/fhir`",
    "profiles_dir": "the StructureDefinitions (profiles and extensions): every write of a resource whose "
    "`meta.profile` names one is checked against it; served at `/fhir/StructureDefinition`",
    "seed_conformance": "write the StructureDefinitions and terminology of those folders to the store at start "
    "(only what changed)",
    "partner_timeout": "seconds allowed to connect to a partner's FHIR server or token endpoint, and again between "
    "bytes of its answer; a timeout is retried later",
    "secrets_dir": "folder that relative `token_file` and `private_key_file` paths of partners resolve against; "
    "default: the current directory",
    "outbox_max_attempts": "delivery attempts to a partner before a delivery is dead (kept and listed, retried only "
    "through `POST /iop/deliveries/{id}/retry`); retries back off exponentially from 2 s up to 1 h, with jitter",
    "worker_lease_seconds": "how long `iop-fhir worker` holds a claimed delivery; if the worker dies, another "
    "takes the delivery after this",
    "cors_origins": "comma-separated browser origins (`https://app.example.org`) allowed to call the API; empty: "
    "no CORS headers at all",
    "signing_key_file": "PEM private key (RSA of 2048 bits or more: RS384; EC P-384: ES384) that signs the service's "
    "access tokens, relative to `secrets_dir`; empty: an EC P-384 key generated once and kept in the database",
    "token_lifetime": "seconds an access token issued at `/auth/token` (or by `iop-fhir token`) is valid",
    "auth_issuer": "`iss` and `aud` of the service's access tokens; empty: `base_url`, or `urn:iop-fhir` when that "
    "is empty too",
    "export_file_lines": "most resources in one NDJSON file of a Bulk Data export (`$export`); more make more files",
    "export_retention": "seconds a finished `$export` job and its files are kept, then deleted (404 afterwards)",
    "audit_flush_ms": "the longest the audit row of a read by the program's own clients waits in its process before "
    "it is committed with the others (group commit); a crash of the process loses at most these milliseconds of such "
    "rows (see the audit section); writes and a partner's requests are committed before they are answered",
    "audit_flush_rows": "most audit rows committed in one transaction; a crash loses at most this many",
    "transition_overdue_days": "days after a transition is queued for an aftercare partner by which the partner "
    "should have accepted it; after that, while its Task is still requested or received, the discharge's transition "
    "says `overdue: true` and `GET /iop/deliveries?status=overdue` lists it",
}
