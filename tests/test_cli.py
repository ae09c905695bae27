"""The iop-fhir command."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from iop_fhir.cli import main


def test_init_db_creates_the_schema_on_an_empty_sqlite_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    monkeypatch.setenv("IOP_FHIR_DATABASE_URL", url)
    assert main(["init-db"]) == 0
    engine = create_engine(url)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"resources", "resource_history", "idx_token", "idx_reference", "alembic_version"} <= tables


def test_unknown_command_exits_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bogus"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
