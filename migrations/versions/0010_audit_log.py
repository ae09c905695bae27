"""The audit log: one narrow row per audited event in ``audit_log``, instead of AuditEvent resources stored, versioned
and indexed like clinical data.

Every current, non-deleted AuditEvent resource moves into the table under its own id (so that references to it, such
as those of the accounting of disclosures, still resolve): its recorded instant, its action (the RESTful interaction
of ``subtype``; DICOM 110106 Export without subtype: disclose, with subtype ``operation``: export), outcome, the
requesting client (``agent.who.identifier``), the partner organisation it acted for (the non-requesting agent's
``who.reference``), purpose of use, the patient (the entity in role Patient), the other entity references, and the
search (``entity.query``, base64). An AuditEvent that this service did not write (no interaction it knows) keeps what
can be read from it: its action code (C, R, U, D, E) as create, read, update, delete or search, and ``unknown`` as the
client if no agent names one. Then every AuditEvent row leaves ``resources``, ``resource_history``,
``version_patients`` and the ``idx_*`` tables: deleted and older versions go with them (an AuditEvent was never
changed through the API; its versions were all the same event).

The downgrade drops the table: the events recorded in it are lost, and the AuditEvent resources moved in by the
upgrade are not written back.

Revision ID: 0010
Revises: 0009
Create Date: 2027-02-05
"""
import base64
import binascii
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

BATCH = 1000
INDEX_TABLES = ("idx_token", "idx_string", "idx_date", "idx_number", "idx_quantity", "idx_reference", "idx_uri")
CLIENT_SYSTEM = "https://iop-fhir.org/fhir/sid/client"  # privacy/audit.py CLIENT_SYSTEM at this revision
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
REST_ACTIONS = frozenset(
    {"read", "vread", "history", "search", "create", "update", "patch", "delete", "batch", "transaction"}
)
BY_ACTION_CODE = {"C": "create", "R": "read", "U": "update", "D": "delete", "E": "search"}
OUTCOMES = frozenset({"0", "4", "8", "12"})
_REFERENCE = re.compile(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}")
_INSTANT = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# The tables as this revision finds them (the migration never imports iop_fhir.store.schema, which moves on).
resources = sa.table(
    "resources",
    sa.column("res_type", sa.String),
    sa.column("res_id", sa.String),
    sa.column("last_updated", sa.BigInteger),
    sa.column("deleted", sa.Boolean),
    sa.column("content", sa.LargeBinary),
)
audit_log = sa.table(
    "audit_log",
    sa.column("id", sa.String),
    sa.column("recorded", sa.BigInteger),
    sa.column("action", sa.String),
    sa.column("outcome", sa.String),
    sa.column("client_id", sa.String),
    sa.column("on_behalf_of", sa.String),
    sa.column("purpose", sa.String),
    sa.column("patient", sa.String),
    sa.column("entities", sa.Text),
    sa.column("query", sa.Text),
)


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("recorded", sa.BigInteger, nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(2), nullable=False),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("on_behalf_of", sa.String(80), nullable=True),
        sa.Column("purpose", sa.String(32), nullable=True),
        sa.Column("patient", sa.String(80), nullable=True),
        sa.Column("entities", sa.Text, nullable=False),
        sa.Column("query", sa.Text, nullable=True),
    )
    op.create_index("ix_audit_log_recorded", "audit_log", ["recorded", "id"])
    op.create_index("ix_audit_log_patient", "audit_log", ["patient", "recorded"])
    op.create_index("ix_audit_log_client", "audit_log", ["client_id", "recorded"])
    op.create_index("ix_audit_log_partner", "audit_log", ["on_behalf_of", "recorded"])
    conn = op.get_bind()
    _move(conn)
    tables = set(sa.inspect(conn).get_table_names())
    for name in ("resources", "resource_history", "version_patients", *INDEX_TABLES):
        if name in tables:
            conn.execute(sa.text(f"DELETE FROM {name} WHERE res_type = 'AuditEvent'"))


def _move(conn: Any) -> None:
    """Every current AuditEvent into audit_log, a page of ids at a time."""
    after = ""
    while True:
        page = conn.execute(
            sa.select(resources.c.res_id, resources.c.last_updated, resources.c.content)
            .where(resources.c.res_type == "AuditEvent", resources.c.deleted == sa.false(), resources.c.res_id > after)
            .order_by(resources.c.res_id)
            .limit(BATCH)
        ).all()
        if not page:
            return
        rows = []
        for res_id, last_updated, content in page:
            try:
                event = orjson.loads(bytes(content)) if content is not None else None
            except orjson.JSONDecodeError:
                event = None
            if isinstance(event, dict):
                rows.append(_row(res_id, last_updated, event))
        if rows:
            conn.execute(sa.insert(audit_log), rows)
        after = page[-1].res_id


def _row(res_id: str, last_updated: int, event: dict[str, Any]) -> dict[str, Any]:
    agents = [a for a in _list(event.get("agent")) if isinstance(a, dict)]
    client = next((_client(a) for a in agents if _client(a) is not None), None)
    partner = next(
        (
            who["reference"]
            for a in agents
            if a.get("requestor") is not True
            and isinstance(who := a.get("who"), dict)
            and isinstance(who.get("reference"), str)
            and who["reference"].startswith("Organization/")
            and _REFERENCE.fullmatch(who["reference"])
        ),
        None,
    )
    purpose = next(
        (
            coding["code"]
            for a in agents
            for concept in _list(a.get("purposeOfUse"))
            if isinstance(concept, dict)
            for coding in _list(concept.get("coding"))
            if isinstance(coding, dict) and coding.get("system") == ACT_REASON and isinstance(coding.get("code"), str)
        ),
        None,
    )
    patient = None
    entities: list[str] = []
    query = None
    for entity in _list(event.get("entity")):
        if not isinstance(entity, dict):
            continue
        reference = (entity.get("what") or {}).get("reference") if isinstance(entity.get("what"), dict) else None
        role = (entity.get("role") or {}).get("code") if isinstance(entity.get("role"), dict) else None
        if isinstance(reference, str) and _REFERENCE.fullmatch(reference):
            if role == "1" and reference.startswith("Patient/") and patient is None:
                patient = reference
            elif reference not in entities:
                entities.append(reference)
        if query is None and isinstance(entity.get("query"), str):
            query = _decoded(entity["query"])
    outcome = event.get("outcome")
    return {
        "id": res_id,
        "recorded": _instant(event.get("recorded")) or last_updated,
        "action": _action(event),
        "outcome": outcome if outcome in OUTCOMES else "0",
        "client_id": (client or "unknown")[:64],
        "on_behalf_of": partner,
        "purpose": purpose[:32] if purpose else None,
        "patient": patient,
        "entities": orjson.dumps(entities).decode(),
        "query": query,
    }


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _client(agent: dict[str, Any]) -> str | None:
    who = agent.get("who")
    identifier = who.get("identifier") if isinstance(who, dict) else None
    if isinstance(identifier, dict) and isinstance(identifier.get("value"), str):
        if identifier.get("system") in (CLIENT_SYSTEM, None) or agent.get("requestor") is True:
            return str(identifier["value"])
    return None


def _action(event: dict[str, Any]) -> str:
    kind = (event.get("type") or {}).get("code") if isinstance(event.get("type"), dict) else None
    subtypes = [s.get("code") for s in _list(event.get("subtype")) if isinstance(s, dict)]
    if kind == "110106":
        return "export" if "operation" in subtypes else "disclose"
    if kind == "rest" and subtypes and subtypes[0] in REST_ACTIONS:
        return str(subtypes[0])
    return BY_ACTION_CODE.get(str(event.get("action")), "read")


def _instant(value: Any) -> int | None:
    found = _INSTANT.fullmatch(value) if isinstance(value, str) else None
    if found is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = found.groups()
    try:
        moment = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=UTC)
    except ValueError:
        return None
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        moment -= sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    micros = int(((fraction or "") + "000000")[:6])
    return (moment - _EPOCH) // timedelta(microseconds=1) + micros


def _decoded(text: str) -> str | None:
    try:
        return base64.b64decode(text, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None


def downgrade() -> None:
    op.drop_index("ix_audit_log_partner", table_name="audit_log")
    op.drop_index("ix_audit_log_client", table_name="audit_log")
    op.drop_index("ix_audit_log_patient", table_name="audit_log")
    op.drop_index("ix_audit_log_recorded", table_name="audit_log")
    op.drop_table("audit_log")
