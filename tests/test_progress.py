"""The long commands (demo seeding, export, sync) show a progress bar when stderr is a terminal, and print nothing
there when it is not (a pipe or a log file): each runs here as a real process with a pseudo-terminal as its stderr.
"""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

IOP_FHIR = [sys.executable, "-m", "iop_fhir.cli"]


def run(args: list[str], env: dict[str, str], cwd: Path, *, terminal: bool) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``iop-fhir args``; stderr a pseudo-terminal if ``terminal``."""
    with (cwd / "stdout").open("w+b") as out:
        if not terminal:
            done = subprocess.run(
                [*IOP_FHIR, *args],
                stdout=out,
                capture_output=False,
                stderr=subprocess.PIPE,
                env=env,
                cwd=cwd,
                timeout=300,
                check=False,
            )
            out.seek(0)
            return done.returncode, out.read().decode(), done.stderr.decode()
        master, slave = pty.openpty()
        # 24 rows of 100 columns, as a terminal window has (a terminal of no size shows no bar).
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        process = subprocess.Popen(
            [*IOP_FHIR, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=slave, env=env, cwd=cwd
        )
        os.close(slave)
        seen = bytearray()
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not data:
                break
            seen += data
        os.close(master)
        status = process.wait(timeout=300)
        out.seek(0)
        return status, out.read().decode(), seen.decode(errors="replace")


DEMO = ["demo", "--patients", "2", "--seed", "11"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("progress")
    return {
        **os.environ,
        "IOP_FHIR_DATABASE_URL": f"sqlite:///{folder / 'demo.db'}",
        "IOP_FHIR_SEED_CONFORMANCE": "false",
    }


@pytest.fixture(scope="module")
def seeded(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, str]:
    """The demo seeded on a terminal, once for the module."""
    return run(DEMO, env, tmp_path_factory.mktemp("demo"), terminal=True)


def test_demo_shows_a_bar_of_the_referrals_seeded_on_a_terminal(seeded: tuple[int, str, str]) -> None:
    status, out, err = seeded
    assert status == 0, out + err
    assert "demo:   0%" in err and "demo: 100%" in err and "4/4" in err and "patient/s" in err
    assert "demo:" not in out  # the summary alone on stdout
    assert out.startswith("iop-fhir demo, seed 11")


def test_export_shows_a_count_of_the_resources_written_on_a_terminal(
    seeded: tuple[int, str, str], env: dict[str, str], tmp_path: Path
) -> None:
    status, out, err = run(["export", "--type", "Patient,Encounter", "--out", "files"], env, tmp_path, terminal=True)
    assert status == 0, out + err
    assert "export: " in err and " resources" in err
    assert '"output"' in out and "export:" not in out


def test_sync_shows_a_bar_of_the_patients_pulled_on_a_terminal(
    seeded: tuple[int, str, str], env: dict[str, str], tmp_path: Path
) -> None:
    # The demo's hospital EHR has an address that does not resolve: every patient is skipped (exit 1), and counted.
    status, out, err = run(["sync", "--once"], env, tmp_path, terminal=True)
    assert status == 1, out + err
    assert "sync: 100%" in err and "patient/s" in err
    assert '"skipped"' in out


@pytest.mark.parametrize(
    ("args", "exit_status"),
    [(DEMO, 0), (["export", "--type", "Patient", "--out", "quiet"], 0), (["sync", "--once"], 1)],
    ids=["demo", "export", "sync"],
)
def test_no_bar_is_written_when_stderr_is_not_a_terminal(
    seeded: tuple[int, str, str], env: dict[str, str], tmp_path: Path, args: list[str], exit_status: int
) -> None:
    status, out, err = run(args, env, tmp_path, terminal=False)
    assert status == exit_status, out + err
    assert "%|" not in err and "/s]" not in err
