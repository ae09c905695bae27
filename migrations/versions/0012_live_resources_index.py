"""The resources of each type, live ones apart, in their default order (res_type, deleted, last_updated, res_id): a
search's total and an unfiltered page are answered from the index alone. The table's rows hold each resource's content, so
counting a large type through them read every page of the table.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_resources_live", "resources", ["res_type", "deleted", "last_updated", "res_id"])


def downgrade() -> None:
    op.drop_index("ix_resources_live", table_name="resources")
