"""Sync cursors: how far `iop-fhir sync` has read each hospital's changes per patient and resource type.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-13
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sync_cursors",
        sa.Column("partner_id", sa.String(64), primary_key=True),
        sa.Column("patient_id", sa.String(64), primary_key=True),
        sa.Column("res_type", sa.String(64), primary_key=True),
        sa.Column("last_updated", sa.Text, nullable=False),
        sa.Column("updated", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("sync_cursors")
