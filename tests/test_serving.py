"""How a worker process settles the app it serves (iop_fhir/serving.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from flask import Flask

from iop_fhir import serving


@pytest.fixture
def restored_collector() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_a_settled_app_is_out_of_the_collectors_reach_and_the_youngest_generation_is_collected_less_often(
    restored_collector: None,
) -> None:
    app = Flask("settled")
    gc.set_threshold(700, 10, 10)

    assert serving.settled(app) is app

    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (serving.GC_YOUNGEST, serving.GC_OLDER, serving.GC_OLDER)
    assert serving.GC_YOUNGEST > 700
