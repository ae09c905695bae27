"""A version belongs to every Patient it names, and one that names a Patient by no local id belongs to an unknown
Patient, whom no partner is permitted. Before this revision a version belonged only to the Patients its indexed
references named: a reference by identifier only (``{"identifier": …}``, typed Patient or, in a Patient compartment
parameter, untyped), one typed Patient by display only, a ``urn:uuid:``, another server's URL or a contained Patient
in a Patient compartment parameter, and a Patient named where no parameter reads (an extension, a contained
resource) did not count, so a partner permitted the version's one named Patient, or none, saw it.

Stored versions are read again with the visibility rule of this revision (iop_fhir.privacy.visibility): each one gets
the Patients it now belongs to and did not (a deletion those of the version it deleted) in version_patients, and a
resource whose current version gained one takes the owner its Patients now give. A version is read in full only when
a cheap look at its JSON finds a Patient it was not given or a reference that names no local resource.

The search index of existing versions is not rebuilt: their identifier-only references stay without an index row
(which only ``:missing`` reads) until the resource is next written.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06
"""

from typing import Any

import orjson
import sqlalchemy as sa
from alembic import op

from iop_fhir.privacy.visibility import REFERENCE_KEYS, named_patients, version_facts
from iop_fhir.r4.indexing import split_reference

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

def _names_no_local_resource(value: Any) -> bool:
    """Whether any Reference in a resource's JSON may name no local resource: one without a reference string that
    carries an identifier or a type, or one whose reference is not a relative ``Type/id``. A superset of what may
    gain an unknown Patient, cheap enough to run on every stored version."""
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str):
            target, target_id, url = split_reference(ref)
            if target is None or target_id is None or url is not None:
                return True
        elif value.keys() <= REFERENCE_KEYS and ("identifier" in value or isinstance(value.get("type"), str)):
            return True
        return any(_names_no_local_resource(v) for v in value.values())
    if isinstance(value, list):
        return any(_names_no_local_resource(v) for v in value)
    return False


def upgrade() -> None:
    conn = op.get_bind()
    h, vp = history.c, version_patients.c
    of_version = (vp.res_type == h.res_type, vp.res_id == h.res_id, vp.version_id == h.version_id)
    kept = [  # what version_patients holds for the version: all rows, named ones, the lowest and highest id
        sa.select(aggregate).where(*of_version).scalar_subquery().label(name)
        for name, aggregate in (
            ("rows", sa.func.count()),
            ("named", sa.func.count(vp.patient_id)),
            ("low", sa.func.min(vp.patient_id)),
            ("high", sa.func.max(vp.patient_id)),
        )
    ]
    query = (
        sa.select(h.res_type, h.res_id, h.version_id, h.content, *kept)
        .order_by(h.res_type, h.res_id, h.version_id)
        .execution_options(stream_results=True, yield_per=BATCH)
    )
    gained: dict[tuple[str, str, int], tuple[set[str | None], set[str | None]]] = {}  # version: (kept, gained)
    previous: tuple[str, str] | None = None
    last: set[str | None] = set()  # what the last version read of the resource gained
    for row in conn.execute(query):
        key = (row.res_type, row.res_id)
        if row.named > 2:
            before = set(_patients_of(conn, row.res_type, row.res_id, row.version_id))
        else:
            before = {p for p in (row.low, row.high) if p is not None} | ({None} if row.rows > row.named else set())
        if row.content is None:  # a deletion keeps the patients of the version it deleted
            added = last - before if previous == key else set()
        else:
            resource = {**orjson.loads(row.content), "resourceType": row.res_type, "id": row.res_id}
            if _names_no_local_resource(resource) or not named_patients(resource) <= before:
                added = set(version_facts(resource).patients) - before
            else:
                added = set()
        previous, last = key, added
        if added:
            gained[(row.res_type, row.res_id, row.version_id)] = (before, added)
    versions = list(gained)
    for start in range(0, len(versions), BATCH):
        _record(conn, {v: gained[v] for v in versions[start : start + BATCH]})


def _patients_of(conn: Any, res_type: str, res_id: str, version_id: int) -> list[str | None]:
    vp = version_patients.c
    query = sa.select(vp.patient_id).where(vp.res_type == res_type, vp.res_id == res_id, vp.version_id == version_id)
    return [row.patient_id for row in conn.execute(query)]


def _record(conn: Any, gained: dict[tuple[str, str, int], tuple[set[str | None], set[str | None]]]) -> None:
    """Give each version the Patients it gained, and each resource whose current version it is the owner they all
    give: the one named Patient, or '*' (several, or one of no local id: version_patients decides)."""
    conn.execute(
        sa.insert(version_patients),
        [
            {"res_type": t, "res_id": i, "version_id": v, "patient_id": patient}
            for (t, i, v), (_, added) in gained.items()
            for patient in added
        ],
    )
    r = resources.c
    current = conn.execute(
        sa.select(r.res_type, r.res_id, r.version_id).where(
            sa.tuple_(r.res_type, r.res_id, r.version_id).in_(list(gained))
        )
    ).all()
    for row in current:
        before, added = gained[(row.res_type, row.res_id, row.version_id)]
        patients = before | added
        [only] = patients if len(patients) == 1 else [None]
        owner = only if only is not None else MANY_OWNERS
        conn.execute(
            sa.update(resources)
            .where(r.res_type == row.res_type, r.res_id == row.res_id)
            .values(owner=owner)
        )


def downgrade() -> None:
    """The Patients given stay: taking them away would show partners what this revision hides."""
