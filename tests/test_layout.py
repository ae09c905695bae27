"""The package layout README.md's "Where things live" describes: imports point down, no module imports another in a
cycle (imports inside functions and under TYPE_CHECKING count), nothing below the app factory imports it, and each
ground package imports only what lies beneath it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tools import import_graph

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "iop_fhir"

# folder → the folders (and top-level modules) of the package its modules may import, besides its own
MAY_IMPORT = {
    "r4": {"errors"},
    "store": {"r4", "errors", "config"},
    "mapping": {"r4", "errors"},
}


@pytest.fixture(scope="module")
def edges() -> dict[str, set[str]]:
    return import_graph.graph(ROOT, PACKAGE)


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_module_imports_another_in_a_cycle(edges: dict[str, set[str]]) -> None:
    assert import_graph.cycles(edges) == []


def test_nothing_below_the_app_factory_imports_it(edges: dict[str, set[str]]) -> None:
    assert import_graph.app_importers(edges, PACKAGE) == []


def test_only_the_app_factory_and_the_command_line_build_from_the_runtime(edges: dict[str, set[str]]) -> None:
    users = sorted(m for m, deps in edges.items() if f"{PACKAGE}.runtime" in deps)
    assert set(users) <= {f"{PACKAGE}.app", f"{PACKAGE}.cli"}, users


@pytest.mark.parametrize("folder", sorted(MAY_IMPORT))
def test_a_ground_package_imports_only_what_lies_beneath_it(edges: dict[str, set[str]], folder: str) -> None:
    allowed = MAY_IMPORT[folder] | {folder}
    upward = sorted(
        f"{module} -> {dep}"
        for module, deps in edges.items()
        if _folder(module) == folder
        for dep in deps
        if _folder(dep) not in allowed
    )
    assert upward == []


def test_the_service_never_imports_the_build_time_tools() -> None:
    importers = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / PACKAGE).rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Import | ast.ImportFrom)
        and any(name.split(".")[0] == "tools" for name in _imported(node))
    )
    assert importers == []


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return [node.module or ""] if not node.level else []


def test_the_checker_sees_a_cycle_through_an_import_inside_a_function(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "low").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "app.py").write_text("from pkg.low import deep\n")
    (package / "low" / "__init__.py").write_text("")
    (package / "low" / "deep.py").write_text("def later():\n    from ..app import create_app\n")
    (package / "low" / "typed.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import app\n"
    )
    found = import_graph.graph(tmp_path, "pkg")
    assert import_graph.cycles(found) == [["pkg.app", "pkg.low.deep"]]
    assert import_graph.app_importers(found, "pkg") == ["pkg.low.deep", "pkg.low.typed"]
