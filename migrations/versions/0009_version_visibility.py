"""What each stored version disclosed: the Patients it referred to (version_patients) and whether it carried a
protected Part 2 label or the counseling-note label (resource_history.protected, .note), so that a version is shown
to a partner's client only if the patients it belonged to at that version permit it; and which clients are the
program's consent management (auth_clients.consents: only they write Consents through /fhir).

Existing versions are filled in from their stored JSON with the indexing of this revision (iop_fhir.r4.indexing); a
deletion takes the patients and labels of the version it deleted.

Revision ID: 0009
Revises: 0008
Create Date: 2027-02-03
"""
from typing import Any

import orjson
import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

history = sa.table(
    "resource_history",
    sa.column("res_type", sa.String),
    sa.column("res_id", sa.String),
    sa.column("version_id", sa.Integer),
    sa.column("content", sa.LargeBinary),
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
BATCH = 1000


def upgrade() -> None:
    op.add_column("resource_history", sa.Column("protected", sa.Boolean, nullable=False, server_default=sa.false()))
    op.add_column("resource_history", sa.Column("note", sa.Boolean, nullable=False, server_default=sa.false()))
    op.create_table(
        "version_patients",
        sa.Column("res_type", sa.String(64), nullable=False),
        sa.Column("res_id", sa.String(64), nullable=False),
        sa.Column("version_id", sa.Integer, nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=True),
    )
    op.create_index("ix_version_patients_version", "version_patients", ["res_type", "res_id", "version_id"])
    op.add_column("auth_clients", sa.Column("consents", sa.Boolean, nullable=False, server_default=sa.false()))
    _backfill(op.get_bind())


def _backfill(conn: Any) -> None:
    from iop_fhir.privacy.visibility import version_facts

    query = sa.select(history.c.res_type, history.c.res_id, history.c.version_id, history.c.content).order_by(
        history.c.res_type, history.c.res_id, history.c.version_id
    )
    previous: tuple[Any, ...] | None = None
    facts: Any = None
    rows: list[dict[str, Any]] = []
    for row in conn.execute(query).all():
        key = (row.res_type, row.res_id)
        if row.content is not None:
            facts = version_facts({**orjson.loads(row.content), "resourceType": row.res_type, "id": row.res_id})
        elif previous != key:
            facts = None  # a deletion with no earlier version kept: nothing to disclose
        previous = key
        if facts is None:
            continue
        if facts.protected or facts.note:
            conn.execute(
                sa.update(history)
                .where(
                    history.c.res_type == row.res_type,
                    history.c.res_id == row.res_id,
                    history.c.version_id == row.version_id,
                )
                .values(protected=facts.protected, note=facts.note)
            )
        rows += [
            {"res_type": row.res_type, "res_id": row.res_id, "version_id": row.version_id, "patient_id": patient}
            for patient in facts.patients
        ]
        if len(rows) >= BATCH:
            conn.execute(sa.insert(version_patients), rows)
            rows = []
    if rows:
        conn.execute(sa.insert(version_patients), rows)


def downgrade() -> None:
    op.drop_column("auth_clients", "consents")
    op.drop_index("ix_version_patients_version", table_name="version_patients")
    op.drop_table("version_patients")
    op.drop_column("resource_history", "note")
    op.drop_column("resource_history", "protected")
