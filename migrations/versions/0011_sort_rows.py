"""Sorted searches walk an index: each index table gets ``sort_asc`` and ``sort_desc``, set on the one row per resource
and param that holds the value ``_sort`` orders by (the lowest for an ascending sort, the highest for a descending one;
for dates the lowest start and the highest end; for references ``idx_reference.sort_value``, new: the target id, or
the URL when there is none), and a
partial index over the flagged rows in sort order, so that a sorted page is read from the index in order instead of
aggregating every index row of every resource of the type.

The flags of existing rows are set here in SQL, one statement per table and direction; rows without a sort value
(a token without a code) are never flagged. On PostgreSQL, statistics over (res_type, param, value) of each index
table let the planner know how many rows a filter matches. The downgrade drops the indexes, statistics and columns.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

# Per index table: the sort value of an ascending and of a descending sort (store/schema.py SORT_VALUES).
SORT_VALUES = {
    "idx_token": ("code", "code"),
    "idx_string": ("norm", "norm"),
    "idx_date": ("low", "high"),
    "idx_number": ("value", "value"),
    "idx_quantity": ("value", "value"),
    "idx_reference": ("sort_value", "sort_value"),
    "idx_uri": ("value", "value"),
}

# PostgreSQL estimates a filter's rows (res_type = ? AND param = ? AND value = ?) as if the columns were independent,
# far too few (Patient gender=female: 19 estimated of 10,000), and then sorts every match of a common value instead
# of walking the sort index; statistics on the columns together give it the real counts.
STATISTICS = {
    "idx_token": "res_type, param, code",
    "idx_string": "res_type, param, norm",
    "idx_reference": "res_type, param, target_type",
    "idx_date": "res_type, param",
    "idx_number": "res_type, param",
    "idx_quantity": "res_type, param",
    "idx_uri": "res_type, param",
}


def upgrade() -> None:
    conn = op.get_bind()
    # The physical row address: index tables have no key of their own.
    row = "ctid" if conn.dialect.name == "postgresql" else "rowid"
    for table, (ascending, descending) in SORT_VALUES.items():
        op.add_column(table, sa.Column("sort_asc", sa.Boolean, nullable=False, server_default=sa.false()))
        op.add_column(table, sa.Column("sort_desc", sa.Boolean, nullable=False, server_default=sa.false()))
        if table == "idx_reference":
            op.add_column(table, sa.Column("sort_value", sa.Text, nullable=True))
            conn.execute(sa.text("UPDATE idx_reference SET sort_value = coalesce(target_id, url)"))
        for flag, value, direction in (("sort_asc", ascending, "ASC"), ("sort_desc", descending, "DESC")):
            conn.execute(
                sa.text(
                    f"UPDATE {table} SET {flag} = TRUE WHERE {row} IN ("  # noqa: S608 (names from this module only)
                    f"SELECT address FROM (SELECT {row} AS address, row_number() OVER ("
                    f"PARTITION BY res_type, res_id, param ORDER BY {value} {direction}) AS n "
                    f"FROM {table} WHERE {value} IS NOT NULL) AS ranked WHERE n = 1)"
                )
            )
        op.create_index(
            f"ix_{table}_sort_asc",
            table,
            ["res_type", "param", sa.text(ascending), "res_id"],
            postgresql_where=sa.column("sort_asc") == sa.true(),
            sqlite_where=sa.column("sort_asc") == sa.true(),
        )
        op.create_index(
            f"ix_{table}_sort_desc",
            table,
            ["res_type", "param", sa.text(f"{descending} DESC"), "res_id"],
            postgresql_where=sa.column("sort_desc") == sa.true(),
            sqlite_where=sa.column("sort_desc") == sa.true(),
        )
    if conn.dialect.name == "postgresql":
        for table, columns in STATISTICS.items():
            conn.execute(
                sa.text(
                    f"CREATE STATISTICS IF NOT EXISTS st_{table}_value (mcv, dependencies) ON {columns} FROM {table}"
                )
            )
        for table in SORT_VALUES:
            conn.execute(sa.text(f"ANALYZE {table}"))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in STATISTICS:
            op.execute(f"DROP STATISTICS IF EXISTS st_{table}_value")
    for table in SORT_VALUES:
        op.drop_index(f"ix_{table}_sort_desc", table_name=table)
        op.drop_index(f"ix_{table}_sort_asc", table_name=table)
        with op.batch_alter_table(table) as batch:
            batch.drop_column("sort_desc")
            batch.drop_column("sort_asc")
            if table == "idx_reference":
                batch.drop_column("sort_value")
