"""Applies the Alembic migrations under ``migrations/`` to a store's database."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, inspect

MIGRATIONS = Path(__file__).resolve().parent.parent.parent / "migrations"


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation treats % specially; URLs carry %-escapes (e.g. options=-csearch_path%3D…).
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return config


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent; serialised by the database on PostgreSQL)."""
    config = alembic_config(engine)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # Several app processes may start at once on an empty database; only one migrates at a time.
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7262019)")
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


def is_empty(engine: Engine) -> bool:
    return not inspect(engine).has_table("resources")


def is_current(engine: Engine) -> bool:
    """Whether the database is at the newest revision (cheap: one query, no migration environment)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision() == head
