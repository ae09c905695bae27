"""FHIR store: current resources, history, search index.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _index_table(name, *columns, value_index, **index_options):
    op.create_table(
        name,
        sa.Column("res_type", sa.String(64), nullable=False),
        sa.Column("res_id", sa.String(64), nullable=False),
        sa.Column("param", sa.String(100), nullable=False),
        *columns,
    )
    op.create_index(f"ix_{name}_resource", name, ["res_type", "res_id"])
    op.create_index(f"ix_{name}_value", name, ["res_type", "param", *value_index, "res_id"], **index_options)


def upgrade() -> None:
    op.create_table(
        "resources",
        sa.Column("res_type", sa.String(64), primary_key=True),
        sa.Column("res_id", sa.String(64), primary_key=True),
        sa.Column("version_id", sa.Integer, nullable=False),
        sa.Column("last_updated", sa.BigInteger, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("content", sa.LargeBinary, nullable=True),
    )
    op.create_index("ix_resources_type_updated", "resources", ["res_type", "last_updated"])
    op.create_table(
        "resource_history",
        sa.Column("res_type", sa.String(64), primary_key=True),
        sa.Column("res_id", sa.String(64), primary_key=True),
        sa.Column("version_id", sa.Integer, primary_key=True),
        sa.Column("last_updated", sa.BigInteger, nullable=False),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("content", sa.LargeBinary, nullable=True),
    )
    op.create_index("ix_history_updated", "resource_history", ["last_updated"])
    op.create_index("ix_history_type_updated", "resource_history", ["res_type", "last_updated"])
    _index_table(
        "idx_token",
        sa.Column("system", sa.Text, nullable=True),
        sa.Column("code", sa.Text, nullable=True),
        sa.Column("text", sa.Text, nullable=True),
        value_index=("code", "system"),
    )
    _index_table(
        "idx_string",
        sa.Column("norm", sa.Text, nullable=False),
        sa.Column("exact", sa.Text, nullable=False),
        value_index=("norm",),
        postgresql_ops={"norm": "text_pattern_ops"},
    )
    _index_table(
        "idx_date",
        sa.Column("low", sa.BigInteger, nullable=False),
        sa.Column("high", sa.BigInteger, nullable=False),
        value_index=("low", "high"),
    )
    _index_table(
        "idx_number",
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("low", sa.Float, nullable=False),
        sa.Column("high", sa.Float, nullable=False),
        value_index=("value",),
    )
    _index_table(
        "idx_quantity",
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("low", sa.Float, nullable=False),
        sa.Column("high", sa.Float, nullable=False),
        sa.Column("system", sa.Text, nullable=True),
        sa.Column("code", sa.Text, nullable=True),
        sa.Column("unit", sa.Text, nullable=True),
        value_index=("value",),
    )
    _index_table(
        "idx_reference",
        sa.Column("target_type", sa.String(64), nullable=True),
        sa.Column("target_id", sa.String(64), nullable=True),
        sa.Column("url", sa.Text, nullable=True),
        value_index=("target_id", "target_type"),
    )
    _index_table("idx_uri", sa.Column("value", sa.Text, nullable=False), value_index=("value",))


def downgrade() -> None:
    for name in ("idx_uri", "idx_reference", "idx_quantity", "idx_number", "idx_date", "idx_string", "idx_token"):
        op.drop_table(name)
    op.drop_table("resource_history")
    op.drop_table("resources")
