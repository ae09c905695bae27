"""Bulk Data $export: the jobs and the NDJSON files they produce.

Revision ID: 0006
Revises: 0005
Create Date: 2027-01-10
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "export_jobs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("principal", sa.Text, nullable=False),
        sa.Column("request", sa.Text, nullable=False),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("transaction_time", sa.BigInteger, nullable=True),
        sa.Column("cursor", sa.Text, nullable=True),
        sa.Column("exported", sa.BigInteger, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("lease_until", sa.BigInteger, nullable=True),
        sa.Column("leased_by", sa.String(200), nullable=True),
        sa.Column("created", sa.BigInteger, nullable=False),
        sa.Column("updated", sa.BigInteger, nullable=False),
        sa.Column("expires", sa.BigInteger, nullable=True),
    )
    op.create_index("ix_export_jobs_due", "export_jobs", ["status", "lease_until"])
    op.create_table(
        "export_files",
        sa.Column("job_id", sa.String(36), primary_key=True),
        sa.Column("file_no", sa.Integer, primary_key=True),
        sa.Column("chunk_no", sa.Integer, primary_key=True),
        sa.Column("res_type", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("lines", sa.Integer, nullable=False),
        sa.Column("content", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("export_files")
    op.drop_index("ix_export_jobs_due", table_name="export_jobs")
    op.drop_table("export_jobs")
