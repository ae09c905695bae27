"""A scratch database per backend for module-scoped store tests: a SQLite file, or a PostgreSQL schema of its own
(dropped afterwards), prepared by the caller."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import Engine, create_engine, text

from tests.conftest import POSTGRES_URL


@contextmanager
def scratch_engine(
    backend: str, tmp_path_factory: pytest.TempPathFactory, name: str, prepare: Callable[[Engine], None]
) -> Iterator[Engine]:
    """An engine on an empty ``backend`` ("sqlite" or "postgres") database named after ``name``, after
    ``prepare(engine)`` (tables and data)."""
    if backend == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path_factory.mktemp(name) / f'{name}.db'}")
        try:
            prepare(engine)
            yield engine
        finally:
            engine.dispose()
        return
    schema_name = f"{name}_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema_name}"'))
    engine = create_engine(POSTGRES_URL, connect_args={"options": f"-csearch_path={schema_name}"})
    try:
        prepare(engine)
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema_name}" CASCADE'))
        admin.dispose()
