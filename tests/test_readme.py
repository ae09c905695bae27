"""The README's commands, copied out of README.md as they are and run on a fresh database: the setup example and the
walkthrough of the demo program (curl and fhirclient) against `iop-fhir serve`.

The two setup commands themselves (create the venv and serve; run the test suite) are what CI does; here the venv is
this one and the server is started the way the first command starts it, on an empty SQLite file in a fresh folder.
Every curl in the README uses `-f`, so an HTTP error fails its block.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.live import free_port, serve

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUN_SECTIONS = ("Setup on a fresh machine", "Walkthrough: the demo program")
# Commands the harness itself stands for: creating the venv and serving (started below), and the test suite.
HARNESS = ("python3 -m venv .venv", "bash .ci/test")
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)


def sections(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for block in re.split(r"^## ", text, flags=re.M)[1:]:
        title, _, body = block.partition("\n")
        found[title.strip()] = body
    return found


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of the fenced blocks of the sections that run, in README order."""
    found = []
    for title in RUN_SECTIONS:
        body = sections(text)[title]
        for language, code in FENCE.findall(body):
            if language in ("sh", "python") and not code.startswith(HARNESS):
                found.append((language, code))
    return found


def script(found: list[tuple[str, str]], port: int) -> str:
    """One bash script of every block (a Python block runs with the venv's python), against the server on ``port``."""
    parts = ["set -euo pipefail"]
    for language, code in found:
        if language == "python":
            code = f".venv/bin/python - <<'PYTHON'\n{code}PYTHON\n"
        parts.append(code.replace("127.0.0.1:8080", f"127.0.0.1:{port}"))
    return "\n".join(parts)


def test_readme_walkthrough_has_curl_and_fhirclient_blocks() -> None:
    found = blocks(README.read_text())
    assert any(language == "sh" and "iop-fhir demo" in code for language, code in found)
    assert any(language == "python" and "fhirclient" in code for language, code in found)
    assert any("$export" in code for _, code in found)
    curls = [line for _, code in found for line in code.splitlines() if line.lstrip().startswith("curl ")]
    assert curls and all(" -sf" in line or " -fs" in line for line in curls), "every curl needs -f to fail on an error"


def test_readme_commands_run_on_a_fresh_database(tmp_path: Path) -> None:
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    found = blocks(README.read_text())
    # The first setup command, as it runs in a fresh folder: ./iop_fhir.db is the embedded default.
    env = {"IOP_FHIR_DATABASE_URL": f"sqlite:///{tmp_path / 'iop_fhir.db'}"}
    with serve(env, tmp_path / "serve.log", cwd=tmp_path) as base:
        port = int(base.rsplit(":", 1)[1])
        (tmp_path / "readme.sh").write_text(script(found, port))
        run = subprocess.run(
            ["bash", "readme.sh"],
            cwd=tmp_path,
            env={**os.environ, **env, "PATH": f"{tmp_path / '.venv' / 'bin'}:{os.environ['PATH']}"},
            capture_output=True,
            text=True,
            timeout=900,
        )
    assert run.returncode == 0, (run.stdout[-6000:], run.stderr[-6000:])


def test_the_port_substitution_leaves_no_default_port_behind() -> None:
    text = script(blocks(README.read_text()), free_port())
    assert "127.0.0.1:8080" not in text
