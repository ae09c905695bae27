"""The Part 2 visibility of each resource's current version on its own row (resources.owner, .protected, .note), so
that a partner's search decides who may see a row from the row and one index, not from correlated subqueries on the
search index per candidate row: owner is the one Patient the version belongs to (null: none; '*': several, or a
Patient reference naming no local id, where version_patients still decides).

Existing rows are filled in from the facts kept for their current version (resource_history, version_patients).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

MANY_OWNERS = "*"  # iop_fhir/store/base.py MANY_OWNERS

resources = sa.table(
    "resources",
    sa.column("res_type", sa.String),
    sa.column("res_id", sa.String),
    sa.column("version_id", sa.Integer),
    sa.column("owner", sa.String),
    sa.column("protected", sa.Boolean),
    sa.column("note", sa.Boolean),
)
history = sa.table(
    "resource_history",
    sa.column("res_type", sa.String),
    sa.column("res_id", sa.String),
    sa.column("version_id", sa.Integer),
    sa.column("protected", sa.Boolean),
    sa.column("note", sa.Boolean),
)
version_patients = sa.table(
    "version_patients",
    sa.column("res_type", sa.String),
    sa.column("res_id", sa.String),
    sa.column("version_id", sa.Integer),
    sa.column("patient_id", sa.String),
)


def upgrade() -> None:
    op.add_column("resources", sa.Column("owner", sa.String(64), nullable=True))
    op.add_column("resources", sa.Column("protected", sa.Boolean, nullable=False, server_default=sa.false()))
    op.add_column("resources", sa.Column("note", sa.Boolean, nullable=False, server_default=sa.false()))
    _backfill(op.get_bind())
    op.create_index("ix_resources_owner", "resources", ["res_type", "deleted", "owner", "protected", "note", "version_id"])


def _backfill(conn: sa.Connection) -> None:
    current = sa.and_(
        history.c.res_type == resources.c.res_type,
        history.c.res_id == resources.c.res_id,
        history.c.version_id == resources.c.version_id,
    )
    flagged = sa.select(history.c.res_type).where(current, history.c.protected | history.c.note)
    conn.execute(
        sa.update(resources)
        .where(flagged.exists())
        .values(
            protected=sa.select(history.c.protected).where(current).scalar_subquery(),
            note=sa.select(history.c.note).where(current).scalar_subquery(),
        )
    )
    vp = version_patients.c
    of_current = (
        vp.res_type == resources.c.res_type,
        vp.res_id == resources.c.res_id,
        vp.version_id == resources.c.version_id,
    )
    # One Patient, named: that one; several, or one unnamed (patient_id null): MANY_OWNERS.
    single = sa.and_(
        sa.func.count(vp.patient_id) == sa.func.count(), sa.func.min(vp.patient_id) == sa.func.max(vp.patient_id)
    )
    owner = sa.select(sa.case((single, sa.func.max(vp.patient_id)), else_=sa.literal(MANY_OWNERS))).where(*of_current)
    conn.execute(
        sa.update(resources)
        .where(sa.select(vp.res_type).where(*of_current).exists())
        .values(owner=owner.scalar_subquery())
    )


def downgrade() -> None:
    op.drop_index("ix_resources_owner", table_name="resources")
    op.drop_column("resources", "note")
    op.drop_column("resources", "protected")
    op.drop_column("resources", "owner")
