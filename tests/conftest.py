"""Shared fixtures: a database per test on SQLite and on PostgreSQL, the app, its client.

PostgreSQL is never skipped: if it cannot be reached the tests that need it fail. Each test session migrates a
schema of its own once; each test starts from empty tables.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text

from iop_fhir.app import create_app
from iop_fhir.config import Settings
from iop_fhir.store import migrate, schema
from tests.auth import TokenClient

# Every test client of every app authenticates (tests/auth.py): nothing is tested with security turned off.
Flask.test_client_class = TokenClient

# Fixtures several test modules share: the Part 2 scenario (a partner, a consenting and a non-consenting patient),
# and an empty database at no revision for the migration tests.
pytest_plugins = ["tests.privacy.scenario", "tests.store.migrating"]

POSTGRES_URL = os.environ.get("IOP_FHIR_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "fhir-examples"
if not EXAMPLES.exists():
    EXAMPLES = Path(os.environ.get("IOP_FHIR_EXAMPLES", "../shared/fhir-examples")).resolve()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    engine = create_engine(f"sqlite:///{path}")
    migrate.upgrade(engine)
    engine.dispose()
    return path


@pytest.fixture(scope="session")
def postgres_schema_url() -> Iterator[str]:
    name = f"iop_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{name}"'))
    url = f"{POSTGRES_URL}{'&' if '?' in POSTGRES_URL else '?'}options=-csearch_path%3D{name}"
    engine = create_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    yield url
    resetting = _RESET_ENGINES.pop(url, None)
    if resetting is not None:
        resetting.dispose()
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{name}" CASCADE'))
    admin.dispose()


_RESET_ENGINES: dict[str, Any] = {}
_RESETS = [0]
# A test leaves a few rows: deleting them takes milliseconds where TRUNCATE of every table takes tens (it rewrites
# each table's files). Every so many resets a TRUNCATE still clears the dead rows the deletes leave behind.
_TRUNCATE_EVERY = 250


def _empty_postgres(url: str) -> None:
    engine = _RESET_ENGINES.get(url)
    if engine is None:
        engine = _RESET_ENGINES[url] = create_engine(url, pool_size=1)
    _RESETS[0] += 1
    tables = schema.metadata.sorted_tables
    with engine.begin() as conn:
        if _RESETS[0] % _TRUNCATE_EVERY == 0:
            names = ", ".join(f'"{t.name}"' for t in tables)
            conn.execute(text(f"TRUNCATE {names}"))
        else:
            for table in reversed(tables):  # children before the tables they refer to
                conn.execute(table.delete())


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty, migrated database: every test that uses it runs once on each database."""
    if request.param == "sqlite":
        path = tmp_path / "iop_fhir.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("postgres_schema_url")
    _empty_postgres(url)
    return url


@pytest.fixture
def postgres_url(request: pytest.FixtureRequest) -> str:
    """An empty, migrated PostgreSQL database (a schema of this test session), for tests that pick the database."""
    url: str = request.getfixturevalue("postgres_schema_url")
    _empty_postgres(url)
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    """An empty SQLite database, for tests of behaviour that does not depend on the database."""
    path = tmp_path / "iop_fhir.db"
    shutil.copy(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def settings(db_url: str) -> Settings:
    # Seeding the conformance resources costs 0.1-0.4 s per app; tests/test_conformance.py turns it on.
    return Settings(database_url=db_url, base_url="http://testserver/fhir", seed_conformance=False)


def _app(settings: Settings) -> Iterator[Flask]:
    app = create_app(settings)
    app.config["TESTING"] = True
    yield app
    app.extensions["iop_fhir.store"].close()


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    yield from _app(settings)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def anonymous(app: Flask) -> FlaskClient:
    """A client that sends no access token."""
    found = app.test_client()
    assert isinstance(found, TokenClient)
    found.anonymous = True
    return found


@pytest.fixture
def sqlite_app(sqlite_url: str) -> Iterator[Flask]:
    yield from _app(Settings(database_url=sqlite_url, base_url="http://testserver/fhir", seed_conformance=False))


@pytest.fixture
def sqlite_client(sqlite_app: Flask) -> FlaskClient:
    return sqlite_app.test_client()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI (.ci/test sets IOP_FHIR_FORBID_SKIPS=1) a skipped test fails the run: a skipped PostgreSQL or peer
    check is a check that did not happen."""
    if os.environ.get("IOP_FHIR_FORBID_SKIPS") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        reporter.write_line(f"{len(skipped)} test(s) skipped; IOP_FHIR_FORBID_SKIPS=1 makes that a failure", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# -- the independent FHIR server that plays hospitals, inpatient units and aftercare providers --------------------

TOOLS = Path(__file__).resolve().parents[2] / "shared" / "tools"


@contextmanager
def running_ehr_server(*arguments: str) -> Iterator[str]:
    """Starts ehr-server on a free port and yields its FHIR base URL (without a trailing slash)."""
    process = subprocess.Popen(
        [str(TOOLS / "ehr-server"), "--port", "0", "--quiet", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline().split()
        assert first and first[0] == "listening", first
        yield first[1].rstrip("/")
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


@pytest.fixture(scope="module")
def ehr_server() -> Iterator[str]:
    """ehr-server with its FHIR API at <root>/fhir/R4, one per test module."""
    with running_ehr_server() as base:
        yield base
