"""Authorization server: registered clients, the service's signing keys, used client assertion jtis.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-20
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "auth_clients",
        sa.Column("client_id", sa.String(64), primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("jwks", sa.Text, nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("partner_id", sa.String(64), nullable=True),
        sa.Column("purpose_of_use", sa.String(32), nullable=True),
        sa.Column("admin", sa.Boolean, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("created", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "auth_keys",
        sa.Column("kid", sa.String(64), primary_key=True),
        sa.Column("private_pem", sa.Text, nullable=False),
        sa.Column("created", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "auth_jtis",
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("jti", sa.String(255), nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("client_id", "jti", name="uq_auth_jtis_client_jti"),
    )
    op.create_index("ix_auth_jtis_expires", "auth_jtis", ["expires_at"])


def downgrade() -> None:
    op.drop_table("auth_jtis")
    op.drop_table("auth_keys")
    op.drop_table("auth_clients")
