"""Inbound referrals and Subscription event counters in tables of their own, moved out of iop_records (where they were
records of kind 'referral' and 'subscription-events').

Revision ID: 0008
Revises: 0007
Create Date: 2027-01-20
"""
from typing import Any

import orjson
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

REFERRAL = "referral"
EVENTS = "subscription-events"

# The tables as this revision leaves them (the migration never imports iop_fhir.store.schema, which moves on).
iop_records = sa.table(
    "iop_records",
    sa.column("kind", sa.String),
    sa.column("id", sa.String),
    sa.column("enrollment_id", sa.String),
    sa.column("status", sa.String),
    sa.column("version", sa.Integer),
    sa.column("content", sa.LargeBinary),
    sa.column("resources", sa.LargeBinary),
    sa.column("created", sa.BigInteger),
    sa.column("updated", sa.BigInteger),
)
inbound_referrals = sa.table(
    "inbound_referrals",
    sa.column("id", sa.String),
    sa.column("status", sa.String),
    sa.column("record_status", sa.String),
    sa.column("enrollment_id", sa.String),
    sa.column("version", sa.Integer),
    sa.column("content", sa.LargeBinary),
    sa.column("resources", sa.LargeBinary),
    sa.column("created", sa.BigInteger),
    sa.column("updated", sa.BigInteger),
)
subscription_events = sa.table(
    "subscription_events",
    sa.column("sub_id", sa.String),
    sa.column("events", sa.BigInteger),
    sa.column("updated", sa.BigInteger),
)


def upgrade() -> None:
    op.create_table(
        "inbound_referrals",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("record_status", sa.String(20), nullable=False),
        sa.Column("enrollment_id", sa.String(64), nullable=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("content", sa.LargeBinary, nullable=False),
        sa.Column("resources", sa.LargeBinary, nullable=False),
        sa.Column("created", sa.BigInteger, nullable=False),
        sa.Column("updated", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_inbound_referrals_created", "inbound_referrals", ["created", "id"])
    op.create_index("ix_inbound_referrals_status", "inbound_referrals", ["status", "created", "id"])
    op.create_table(
        "subscription_events",
        sa.Column("sub_id", sa.String(64), primary_key=True),
        sa.Column("events", sa.BigInteger, nullable=False),
        sa.Column("updated", sa.BigInteger, nullable=False),
    )
    conn = op.get_bind()
    referrals = [
        {
            "id": row.id,
            "status": orjson.loads(row.content)["status"],
            "record_status": row.status,
            "enrollment_id": row.enrollment_id,
            "version": row.version,
            "content": bytes(row.content),
            "resources": bytes(row.resources),
            "created": row.created,
            "updated": row.updated,
        }
        for row in _records(conn, REFERRAL)
    ]
    counters = [
        {"sub_id": row.id, "events": int(orjson.loads(row.content).get("events", 0)), "updated": row.updated}
        for row in _records(conn, EVENTS)
    ]
    _move(conn, inbound_referrals, referrals, REFERRAL)
    _move(conn, subscription_events, counters, EVENTS)


def downgrade() -> None:
    conn = op.get_bind()
    referrals = [
        {
            "kind": REFERRAL,
            "id": row.id,
            "enrollment_id": row.enrollment_id,
            "status": row.record_status,
            "version": row.version,
            "content": bytes(row.content),
            "resources": bytes(row.resources),
            "created": row.created,
            "updated": row.updated,
        }
        for row in conn.execute(sa.select(inbound_referrals))
    ]
    # A counter record's version was its count; when it was created is not kept: its last update stands for it.
    counters = [
        {
            "kind": EVENTS,
            "id": row.sub_id,
            "enrollment_id": None,
            "status": "active",
            "version": row.events,
            "content": orjson.dumps({"events": row.events}),
            "resources": b"[]",
            "created": row.updated,
            "updated": row.updated,
        }
        for row in conn.execute(sa.select(subscription_events))
    ]
    for rows in (referrals, counters):
        if rows:
            conn.execute(iop_records.insert(), rows)
    op.drop_table("subscription_events")
    op.drop_table("inbound_referrals")


def _records(conn: sa.Connection, kind: str) -> list[Any]:
    return list(conn.execute(sa.select(iop_records).where(iop_records.c.kind == kind)))


def _move(conn: sa.Connection, table: sa.TableClause, rows: list[dict[str, Any]], kind: str) -> None:
    if rows:
        conn.execute(table.insert(), rows)
    conn.execute(iop_records.delete().where(iop_records.c.kind == kind))
