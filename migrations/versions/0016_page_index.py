"""A resource's place in the default order by its id (res_type, res_id, deleted, last_updated): a search's page is
chosen among its matches from this index alone, and only the page's rows, with their content, are read.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-05
"""

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_resources_page", "resources", ["res_type", "res_id", "deleted", "last_updated"])


def downgrade() -> None:
    op.drop_index("ix_resources_page", table_name="resources")
