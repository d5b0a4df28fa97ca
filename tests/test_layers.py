"""Imports run one way: the layer table of docs/design.md, checked against every module's imports (read with ast)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fusionlib"


def layer_table() -> dict[str, int]:
    """``{entry: row}`` from the fenced ``layers`` block of docs/design.md (row 0 is the lowest layer)."""
    text = (ROOT / "docs" / "design.md").read_text()
    blocks = re.findall(r"```layers\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "docs/design.md needs exactly one ```layers block"
    rows = [line.split()[1:] for line in blocks[0].splitlines() if line.strip()]
    return {entry: rank for rank, entries in enumerate(rows) for entry in entries}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(source: str, me: str, is_package: bool) -> set[str]:
    """Every fusionlib module that ``source`` (module ``me``) imports anywhere: top level or inside functions.

    ``from a import b`` counts as ``a.b`` when that is a module, else ``a``;
    relative imports are resolved; ``importlib.import_module("fusionlib....")`` counts too.
    """
    package = me if is_package else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return {m for m in found if m in MODULES and m != me}


def entry_of(module: str) -> str:
    """The layer-table entry of a module: ``fusionlib.quant.qat`` -> ``quant``, ``fusionlib`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def upward_imports(graph: dict[str, set[str]], table: dict[str, int]) -> list[str]:
    return [f"{m} ({entry_of(m)}) imports {t} ({entry_of(t)})" for m in sorted(graph) for t in sorted(graph[m])
            if table[entry_of(t)] > table[entry_of(m)]]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Depth-first search; every back edge closes a circle, returned as its path ``[a, b, ..., a]``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    found: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        path = path + [module]
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path)
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    return found


GRAPH = {m: imported_modules(p.read_text(), m, p.name == "__init__.py") for m, p in MODULES.items()}


def test_every_module_has_a_layer_and_every_entry_a_module():
    table, entries = layer_table(), {entry_of(m) for m in MODULES}
    assert sorted(entries - set(table)) == [], "modules missing from the layer table in docs/design.md"
    assert sorted(set(table) - entries) == [], "layer-table entries with no module"


def test_imports_go_to_the_same_layer_or_below():
    assert upward_imports(GRAPH, layer_table()) == []


def test_no_import_circles():
    assert [" -> ".join(c) for c in circles(GRAPH)] == []


def test_the_checker_sees_lazy_imports_upward_imports_and_circles():
    source = ("from . import modules\n"
              "def f():\n    from fusionlib import zoo\n    import importlib\n    importlib.import_module('fusionlib.cli')\n")
    found = imported_modules(source, "fusionlib.display", is_package=False)
    assert found == {"fusionlib.modules", "fusionlib.zoo", "fusionlib.cli"}
    graph = {"fusionlib.display": found, "fusionlib.zoo": {"fusionlib.models"}, "fusionlib.models": {"fusionlib.zoo"}}
    assert len(upward_imports(graph, layer_table())) == 3  # display -> modules is sideways
    assert circles(graph) == [["fusionlib.zoo", "fusionlib.models", "fusionlib.zoo"]]


def test_the_runner_imports_one_way():
    """Inside the course layer: experiments -> sweeps (plan -> results -> execute -> plot) -> cli; nothing
    imports the command line."""
    graph = {m: imported_modules(path.read_text(), m, path.name == "__init__.py") for m, path in MODULES.items()}
    assert not [m for m, imports in graph.items() if "fusionlib.cli" in imports and m != "fusionlib.__main__"]
    runner = ["fusionlib.experiments", "fusionlib.sweeps.plan", "fusionlib.sweeps.results",
              "fusionlib.sweeps.execute", "fusionlib.sweeps.plot", "fusionlib.sweeps", "fusionlib.cli"]
    for i, module in enumerate(runner):
        later = [m for m in runner[i + 1:] if m in graph[module]]
        assert not later, f"{module} imports {later}, which sit above it"
