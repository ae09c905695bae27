"""A version that refers to a Patient by no local id belongs to an unknown Patient, whom no partner is permitted:
a reference by identifier only (``{"identifier": …}``, typed Patient or, in a Patient compartment parameter,
untyped), one typed Patient by display only, and, in a Patient compartment parameter, a ``urn:uuid:``, another
server's URL or a contained Patient. Before this revision such a version counted as belonging to no patient, so a
partner saw it when it carried no label.

Stored versions are read again with the visibility rule of this revision (iop_fhir.privacy.visibility): each one that
now gains the unknown Patient gets it in version_patients (a deletion with the version it deleted), and a resource
whose current version gains it takes resources.owner '*', where version_patients decides. Only versions holding a
reference that names no local resource are read in full; the others cannot change.

The search index of existing versions is not rebuilt: their identifier-only references stay without an index row
(which only ``:missing`` reads) until the resource is next written.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06
"""

import re
from typing import Any

import orjson
import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

MANY_OWNERS = "*"  # iop_fhir/store/base.py MANY_OWNERS
BATCH = 1000

resources = sa.table(
    "resources",
    sa.column("res_type", sa.String),
    sa.column("res_id", sa.String),
    sa.column("version_id", sa.Integer),
    sa.column("owner", sa.String),
)
history = sa.table(
    "resource_history",
    sa.column("res_type", sa.String),
    sa.column("res_id", sa.String),
    sa.column("version_id", sa.Integer),
    sa.column("content", sa.LargeBinary),
)
version_patients = sa.table(
    "version_patients",
    sa.column("res_type", sa.String),
    sa.column("res_id", sa.String),
    sa.column("version_id", sa.Integer),
    sa.column("patient_id", sa.String),
)

_LOCAL = re.compile(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}(/_history/[A-Za-z0-9\-.]{1,64})?")
_REFERENCE_KEYS = frozenset({"id", "extension", "reference", "type", "identifier", "display"})


def _names_no_local_resource(value: Any) -> bool:
    """Whether any Reference in a resource's JSON may name no local resource: one without a relative reference that
    carries an identifier or a type, or one whose reference is not ``Type/id``. A superset of what may gain an
    unknown Patient, cheap enough to run on every stored version."""
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str):
            if not _LOCAL.fullmatch(ref):
                return True
        elif value.keys() <= _REFERENCE_KEYS and ("identifier" in value or isinstance(value.get("type"), str)):
            return True
        return any(_names_no_local_resource(v) for v in value.values())
    if isinstance(value, list):
        return any(_names_no_local_resource(v) for v in value)
    return False


def upgrade() -> None:
    conn = op.get_bind()
    from iop_fhir.privacy.visibility import version_facts

    h = history.c
    query = (
        sa.select(h.res_type, h.res_id, h.version_id, h.content)
        .order_by(h.res_type, h.res_id, h.version_id)
        .execution_options(stream_results=True, yield_per=BATCH)
    )
    gained: list[tuple[str, str, int]] = []  # versions that gain the unknown Patient
    previous: tuple[str, str] | None = None
    unknown = False  # whether the last version of the resource read belongs to an unknown Patient
    for row in conn.execute(query):
        key = (row.res_type, row.res_id)
        if row.content is None:  # a deletion keeps the patients of the version it deleted
            unknown = unknown and previous == key
        else:
            resource = orjson.loads(row.content)
            unknown = _names_no_local_resource(resource) and None in version_facts(
                {**resource, "resourceType": row.res_type, "id": row.res_id}
            ).patients
        previous = key
        if unknown:
            gained.append((row.res_type, row.res_id, row.version_id))
    for start in range(0, len(gained), BATCH):
        _record(conn, gained[start : start + BATCH])


def _record(conn: Any, versions: list[tuple[str, str, int]]) -> None:
    """Give each version the unknown Patient (once), and each resource whose current version it is owner '*'."""
    vp = version_patients.c
    keys = sa.tuple_(vp.res_type, vp.res_id, vp.version_id)
    known = {
        (r.res_type, r.res_id, r.version_id)
        for r in conn.execute(
            sa.select(vp.res_type, vp.res_id, vp.version_id).where(keys.in_(versions), vp.patient_id.is_(None))
        )
    }
    missing = [v for v in versions if v not in known]
    if missing:
        conn.execute(
            sa.insert(version_patients),
            [{"res_type": t, "res_id": i, "version_id": v, "patient_id": None} for t, i, v in missing],
        )
    r = resources.c
    conn.execute(
        sa.update(resources)
        .where(sa.tuple_(r.res_type, r.res_id, r.version_id).in_(versions))
        .values(owner=MANY_OWNERS)
    )


def downgrade() -> None:
    """The unknown Patients stay: taking them away would show partners what this revision hides."""
