"""The package's import graph: no cycles, and no module imports from a layer above its own.

The layers are stated in `sftrainer/__init__.py`'s docstring; `LAYERS` below is the same table, and the
first test checks that the two agree. Every `import` counts, at module level or inside a function (an
import moved into a function to hide a cycle is still a cycle), except those under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sftrainer"

# Layer number -> the modules in it (dotted names under `sftrainer.`; `pkg.*` is every module of a package).
LAYERS: dict[int, list[str]] = {}  # filled from the package docstring by _documented_layers()


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The sftrainer modules `name` imports (a name imported from a package counts as its submodule
    where one exists, else as the package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
            for n in ast.walk(node) if n is not node}  # fmt: skip
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = alias.name
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            if not source.startswith("sftrainer"):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.add(sub if sub in modules else source)
    found.discard(name)
    return {m for m in found if m in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _documented_layers() -> dict[str, int]:
    """`sftrainer/__init__.py`'s docstring: lines `N  name, name, pkg.*  — what the layer is`."""
    doc = ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))) or ""
    table: dict[str, int] = {}
    for line in doc.splitlines():
        match = re.match(r"\s*L(\d+)\s+(.+?)\s+(?:-|—)\s", line)
        if match:
            for entry in match.group(2).split(","):
                table[entry.strip()] = int(match.group(1))
    return table


def _layer(module: str, table: dict[str, int]) -> int | None:
    short = module.removeprefix("sftrainer").removeprefix(".") or "sftrainer"
    if short in table:
        return table[short]
    if f"{short}.*" in table:  # the package itself
        return table[f"{short}.*"]
    package = short
    while "." in package:
        package = package.rpartition(".")[0]
        if f"{package}.*" in table:
            return table[f"{package}.*"]
    return None


def test_every_module_has_a_documented_layer():
    table = _documented_layers()
    assert table, "sftrainer/__init__.py's docstring states no layers (lines like `L1  data.*  — ...`)"
    modules = _modules()
    missing = sorted(m for m in modules if _layer(m, table) is None)
    assert not missing, f"modules in no layer of sftrainer/__init__.py's docstring: {missing}"
    names = {m.removeprefix("sftrainer").removeprefix(".") or "sftrainer" for m in modules}
    stale = sorted(e for e in table if e.removesuffix(".*") not in names)
    assert not stale, f"sftrainer/__init__.py's layers name modules that do not exist: {stale}"


def test_no_import_cycles():
    graph = _graph()
    cycles = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_run_downward():
    table = _documented_layers()
    upward = [
        f"{a} (L{_layer(a, table)}) imports {b} (L{_layer(b, table)})"
        for a, targets in sorted(_graph().items())
        for b in sorted(targets)
        if (_layer(a, table) or 0) < (_layer(b, table) or 0)
    ]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from sftrainer.data import pack\n", {"sftrainer.data.pack"}),
        ("from . import pack\n", {"sftrainer.data.pack"}),
        ("from ..errors import DataError\n", {"sftrainer.errors"}),
        ("def f():\n    import sftrainer.data.pack\n", {"sftrainer.data.pack"}),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sftrainer import errors\n", set()),
    ],
)
def test_the_graph_reads_every_kind_of_import(tmp_path, source, expected):
    """The checker itself: relative, function-level and TYPE_CHECKING imports resolve as intended."""
    modules = {"sftrainer.data.pack": Path(), "sftrainer.errors": Path(), "sftrainer.data": Path()}
    path = tmp_path / "collate.py"
    path.write_text(source)
    assert _imports("sftrainer.data.collate", path, modules) == expected
