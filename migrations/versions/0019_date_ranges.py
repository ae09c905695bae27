"""Two partial indexes on idx_date for searches that bound a date parameter from both sides (store/schema.py
SHORT_DATE): ix_idx_date_long holds the rows that span more than a week, ix_idx_date_several the rows of a resource
with several values of the parameter. The range's other rows are then found from where they start, on
ix_idx_date_value, in one read of the range and the week before it, rather than as the intersection of two sets that
each hold half the parameter's rows.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

SHORT_DATE = 7 * 24 * 3600 * 1_000_000  # iop_fhir/store/schema.py SHORT_DATE


def upgrade() -> None:
    long = f"high - low > {SHORT_DATE}"
    op.create_index(
        "ix_idx_date_long",
        "idx_date",
        ["res_type", "param", "low", "high", "res_id"],
        postgresql_where=sa.text(long),
        sqlite_where=sa.text(long),
    )
    op.create_index(
        "ix_idx_date_several",
        "idx_date",
        ["res_type", "param", "res_id"],
        postgresql_where=sa.text("sort_asc = false OR sort_desc = false"),
        sqlite_where=sa.text("sort_asc = 0 OR sort_desc = 0"),
    )


def downgrade() -> None:
    op.drop_index("ix_idx_date_several", table_name="idx_date")
    op.drop_index("ix_idx_date_long", table_name="idx_date")
