"""PostgreSQL keeps per-value counts (the most common values) for up to 1,000 reference targets rather than 100: a
network's patients are each referred to by thousands of rows, and with counts for only a hundred of them the planner
took a patient's (or a chain's) ten thousand matches for a few hundred and read them all to page twenty. SQLite has
no such setting.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-05
"""

from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

TARGET = 1000


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE idx_reference ALTER COLUMN target_id SET STATISTICS {TARGET}")
        op.execute("ANALYZE idx_reference")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE idx_reference ALTER COLUMN target_id SET STATISTICS -1")
