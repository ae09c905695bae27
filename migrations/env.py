"""Alembic environment: runs the migrations on the connection or URL that iop_fhir.store.migrate passes in."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from iop_fhir.store.schema import metadata

config = context.config
connection = config.attributes.get("connection")


def run(conn: object) -> None:
    context.configure(connection=conn, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    run(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "sqlite:///iop_fhir.db")
    with engine.connect() as conn:
        run(conn)
