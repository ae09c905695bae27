"""The key of an enrollment's records (iop_fhir/store/sql.py stay_keys): an index on each record's enrollment, kind,
version and update, from which the outcomes tell, without reading any record's content, which stays changed since
they were built.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05
"""

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_iop_records_stay_key", "iop_records", ["enrollment_id", "kind", "version", "updated"])


def downgrade() -> None:
    op.drop_index("ix_iop_records_stay_key", table_name="iop_records")
