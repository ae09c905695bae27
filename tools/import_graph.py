"""The import graph of a package's modules, counting every import: inside functions, under ``TYPE_CHECKING``, and
relative ones. What the layout rules of README.md ("Where things live") are checked against.

    python -m tools.import_graph [--package iop_fhir] [PROJECT_DIR]

prints each import cycle (modules that reach each other) and each module below the app factory that imports it, and
exits 1 when there is any. tests/test_layout.py runs the same checks and the layer rules.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from pathlib import Path

# Modules that may build or import the app factory: the factory itself, the command line, the package root (its
# lazy ``create_app``) and the OpenAPI writer (it renders the document of a built app).
APP_USERS = ("app", "cli", "", "openapi")


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name → file, for every module of ``package`` under ``root``."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _resolve(name: str, known: Iterable[str]) -> str | None:
    """The module a dotted name is, or lies in (``a.b.c`` of module ``a.b``: the attribute ``c`` of it)."""
    names = set(known)
    while name:
        if name in names:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, known: Iterable[str]) -> set[str]:
    """The modules of the package that ``module`` imports anywhere in its file."""
    names = set(known)
    package_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # ``from a import b`` imports the module a.b if there is one, else the name b of module a
            targets = [f"{origin}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            resolved = _resolve(target, names)
            if resolved is not None and resolved != module:
                found.add(resolved)
    # importing a submodule loads its parent packages: that is no edge of the design
    return {m for m in found if not module.startswith(m + ".")}


def graph(root: Path, package: str) -> dict[str, set[str]]:
    known = modules(root, package)
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def app_importers(edges: dict[str, set[str]], package: str) -> list[str]:
    """Modules below the app factory that import it."""
    app = f"{package}.app"
    allowed = {f"{package}.{m}".rstrip(".") for m in APP_USERS}
    return sorted(m for m, deps in edges.items() if app in deps and m not in allowed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.import_graph", description=__doc__.splitlines()[0])
    parser.add_argument("project", nargs="?", default=".")
    parser.add_argument("--package", default="iop_fhir")
    args = parser.parse_args(argv)
    edges = graph(Path(args.project).resolve(), args.package)
    found, upward = cycles(edges), app_importers(edges, args.package)
    for component in found:
        print("cycle:", " <-> ".join(component))
    for module in upward:
        print("imports the app factory:", module)
    print(
        f"{len(found)} import cycles ({sum(map(len, found))} modules), {len(upward)} modules below the app importing it"
    )
    return 1 if found or upward else 0


if __name__ == "__main__":
    sys.exit(main())
