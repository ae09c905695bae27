"""What the migration tests share: an empty database at no revision yet (on SQLite and PostgreSQL), and moving it to
a revision. Its fixture reaches the tests through ``pytest_plugins`` in tests/conftest.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, create_engine, text

from iop_fhir.store import migrate
from tests.conftest import POSTGRES_URL


@pytest.fixture(params=["sqlite", "postgres"])
def unmigrated_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of this test's own, at no revision yet, on each database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'iop_fhir.db'}"
        return
    name = f"iop_migration_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{name}"'))
    try:
        yield f"{POSTGRES_URL}{'&' if '?' in POSTGRES_URL else '?'}options=-csearch_path%3D{name}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{name}" CASCADE'))
        admin.dispose()


def migrate_to(engine: Engine, revision: str, *, down: bool = False) -> None:
    """Upgrade (or with ``down`` downgrade) the database of ``engine`` to ``revision``."""
    config = migrate.alembic_config(engine)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(config, revision)
