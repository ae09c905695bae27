"""`iop-fhir report`: a program's outcome page for a period with a page per stay beside it, on a small seeded demo
(6 patients, seeded once for the module); bad arguments are one line on stderr and exit status 2, writing nothing."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest

from iop_fhir import demo
from iop_fhir.app import create_app
from iop_fhir.cli import main
from iop_fhir.config import Settings
from iop_fhir.outcomes import program

TODAY = "2026-12-04"
YEAR = ["--from", "2026-01-01", "--to", "2026-12-31", "--today", TODAY]


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> Iterator[tuple[str, dict[str, int]]]:
    """The URL of a database seeded with a 6-patient demo, and how many stays each program has in 2026."""
    path = tmp_path_factory.mktemp("report") / "demo.db"
    shutil.copy(sqlite_template, path)
    url = f"sqlite:///{path}"
    app = create_app(Settings(database_url=url, base_url="http://testserver/fhir", seed_conformance=False))
    demo.seed(app, patients=6)
    loaded = app.extensions["iop_fhir.outcomes"].stays()
    period = program.Period(date(2026, 1, 1), date(2026, 12, 31))
    counts: dict[str, int] = {}
    for stay in program.cohort(loaded.stays, period, None):
        counts[stay.program] = counts.get(stay.program, 0) + 1
    app.extensions["iop_fhir.store"].close()
    yield url, counts


@pytest.fixture
def env(database: tuple[str, dict[str, int]], monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    monkeypatch.setenv("IOP_FHIR_DATABASE_URL", database[0])
    return database[1]


def test_report_writes_the_program_page_and_a_linked_page_per_stay(
    env: dict[str, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stays = max(env.items(), key=lambda item: item[1])
    out = tmp_path / "q.html"
    assert main(["report", "--program", code, *YEAR, "--out", str(out)]) == 0
    html = out.read_text(encoding="utf-8")
    assert f"IOP outcomes: {code}, 2026-01-01 to 2026-12-31" in html
    assert "as of 2026-12-04" in html
    assert len(re.findall(r"<svg\b", html)) == 4
    links = re.findall(r'<a class="id" href="([^"]+)">([^<]+)</a>', html)
    assert len(links) == stays > 0
    for href, enrollment_id in links:
        assert href == f"q-stays/{enrollment_id}.html"
        stay_page = (tmp_path / href).read_text(encoding="utf-8")
        assert f"Stay outcomes: enrollment {enrollment_id}" in stay_page
        assert re.search(r'<figure[^>]* id="hours"><svg\b', stay_page)
    assert sorted(p.name for p in (tmp_path / "q-stays").iterdir()) == sorted(f"{e}.html" for _, e in links)
    assert capsys.readouterr().err.strip() == f"{out}: {stays} stays; their pages in {tmp_path / 'q-stays'}/"


def test_report_of_a_period_without_stays_is_a_page_saying_so(env: dict[str, int], tmp_path: Path) -> None:
    out = tmp_path / "empty.html"
    args = ["--from", "2025-01-01", "--to", "2025-01-31", "--today", TODAY]
    assert main(["report", "--program", "adolescent-sud", *args, "--out", str(out)]) == 0
    html = out.read_text(encoding="utf-8")
    assert "No stays in this period." in html and "<svg" not in html
    assert list((tmp_path / "empty-stays").iterdir()) == []


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        (["--from", "2026-13-01"], "--from must be a date (YYYY-MM-DD), got '2026-13-01'"),
        (["--to", "yesterday"], "--to must be a date (YYYY-MM-DD), got 'yesterday'"),
        (["--today", "2026-1-4"], "--today must be a date (YYYY-MM-DD), got '2026-1-4'"),
        (["--from", "2026-06-01", "--to", "2026-05-31"], "--from (2026-06-01) is after --to (2026-05-31)"),
        (
            ["--program", "adult-gambling"],
            "--program must be one of: adolescent-sud, adult-co-occurring, adult-sud; got 'adult-gambling'",
        ),
    ],
)
def test_bad_arguments_are_one_line_on_stderr_and_exit_2(
    env: dict[str, int], tmp_path: Path, capsys: pytest.CaptureFixture[str], changed: list[str], message: str
) -> None:
    out = tmp_path / "q.html"
    args = ["report", "--program", "adult-sud", *YEAR, "--out", str(out), *changed]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err == f"iop-fhir report: {message}\n"
    assert list(tmp_path.iterdir()) == []


def test_an_out_file_in_a_missing_folder_is_refused(
    env: dict[str, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "nowhere" / "q.html"
    assert main(["report", "--program", "adult-sud", *YEAR, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"iop-fhir report: --out {out}: its folder {out.parent} does not exist\n"
