"""The days a stay is found by, on the IOP records' rows: record_day (an enrollment's admission, a discharge's day)
and, on an enrollment's row, stay_end (the day of its latest active discharge); and group_attendees, the enrollments
each group session names. The outcomes of a period then read only the stays that can overlap it, and their records,
instead of every record of the program.

Existing rows are filled in from their stored content, read as iop_fhir/store/base.py (record_day, attendees) reads
it at this revision.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05
"""

from collections import defaultdict
from datetime import date
from typing import Any

import orjson
import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

BATCH = 1000
DATED_BY = {"enrollment": "admission_date", "discharge": "discharge_date"}
GROUP_SESSION = "group-session"

records = sa.table(
    "iop_records",
    sa.column("kind", sa.String),
    sa.column("id", sa.String),
    sa.column("enrollment_id", sa.String),
    sa.column("status", sa.String),
    sa.column("content", sa.LargeBinary),
    sa.column("created", sa.BigInteger),
    sa.column("updated", sa.BigInteger),
    sa.column("record_day", sa.String),
    sa.column("stay_end", sa.String),
)
group_attendees = sa.table("group_attendees", sa.column("group_id", sa.String), sa.column("enrollment_id", sa.String))


def upgrade() -> None:
    op.add_column("iop_records", sa.Column("record_day", sa.String(10), nullable=True))
    op.add_column("iop_records", sa.Column("stay_end", sa.String(10), nullable=True))
    op.create_table(
        "group_attendees",
        sa.Column("group_id", sa.String(64), primary_key=True),
        sa.Column("enrollment_id", sa.String(64), primary_key=True),
    )
    _backfill(op.get_bind())
    op.create_index("ix_iop_records_stays", "iop_records", ["kind", "status", "stay_end", "record_day"])
    op.create_index("ix_group_attendees_enrollment", "group_attendees", ["enrollment_id", "group_id"])


def record_day(kind: str, content: dict[str, Any]) -> str | None:
    value = content.get(DATED_BY.get(kind, ""))
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return date.fromisoformat(value[:10]).isoformat()
    except ValueError:
        return None


def attendees(kind: str, content: dict[str, Any]) -> list[str]:
    if kind != GROUP_SESSION:
        return []
    found = (a.get("enrollment_id") for a in content.get("attendees") or () if isinstance(a, dict))
    return list(dict.fromkeys(e for e in found if isinstance(e, str)))


def _backfill(conn: sa.Connection) -> None:
    dated = sa.update(records).where(records.c.kind == sa.bindparam("k"), records.c.id == sa.bindparam("i"))
    days: list[dict[str, Any]] = []
    members: list[dict[str, Any]] = []
    # enrollment id -> (updated, created, id, day) of each active discharge
    discharges: dict[str, list[tuple[int, int, str, str | None]]] = defaultdict(list)
    query = sa.select(
        records.c.kind,
        records.c.id,
        records.c.enrollment_id,
        records.c.status,
        records.c.content,
        records.c.created,
        records.c.updated,
    ).where(records.c.kind.in_([*DATED_BY, GROUP_SESSION]))
    for row in conn.execute(query).all():
        content = orjson.loads(row.content)
        day = record_day(row.kind, content)
        if day is not None:
            days.append({"k": row.kind, "i": row.id, "d": day})
        members += [{"group_id": row.id, "enrollment_id": e} for e in attendees(row.kind, content)]
        if row.kind == "discharge" and row.status == "active" and row.enrollment_id is not None:
            discharges[row.enrollment_id].append((row.updated, row.created, row.id, day))
        if len(days) >= BATCH:
            conn.execute(dated.values(record_day=sa.bindparam("d")), days)
            days = []
        if len(members) >= BATCH:
            conn.execute(sa.insert(group_attendees), members)
            members = []
    if days:
        conn.execute(dated.values(record_day=sa.bindparam("d")), days)
    if members:
        conn.execute(sa.insert(group_attendees), members)
    # The latest active discharge (the latest updated; the first created of equals) ends the stay.
    ends = [
        {"k": "enrollment", "i": enrollment_id, "d": min(found, key=lambda d: (-d[0], d[1], d[2]))[3]}
        for enrollment_id, found in discharges.items()
    ]
    for start in range(0, len(ends), BATCH):
        conn.execute(dated.values(stay_end=sa.bindparam("d")), ends[start : start + BATCH])


def downgrade() -> None:
    op.drop_index("ix_group_attendees_enrollment", table_name="group_attendees")
    op.drop_index("ix_iop_records_stays", table_name="iop_records")
    op.drop_table("group_attendees")
    op.drop_column("iop_records", "stay_end")
    op.drop_column("iop_records", "record_day")
