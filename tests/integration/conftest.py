"""The independent FHIR server (../shared/tools/ehr-server) that plays hospitals, inpatient units and aftercare
providers in the exchange tests."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[3] / "shared" / "tools"


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
