"""The package's layout: its import graph has no cycle (a module never imports, directly or not, a module that
imports it), no file grows past a size one reads in a sitting, and every op's parts carry its name.

The import graph is read from the source (the AST of every fastmsc/**/*.py), not by importing: ``import`` and
``from ... import`` statements anywhere in a module, those deferred into functions included, since a deferred
import that closes a circle still ties the two modules together. Imports made by name at run time (importlib)
are not seen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fastmsc"


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, whether it is a package's __init__)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the fastmsc modules it imports. ``from . import name`` points at the submodule ``name`` when
    there is one, else at the package; a name that is no module (``fastmsc.x.f``) at its closest module."""
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each holds at least one cycle)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_known_edges():
    graph = import_graph()
    assert "fastmsc.train" in graph["fastmsc.ensemble"]
    assert "fastmsc.ensemble" in graph["fastmsc.commands.train"]
    assert "fastmsc.dispatch" in graph["fastmsc.backend"]  # from . import dispatch


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_library_never_imports_the_command_lines():
    graph = import_graph()
    library = [m for m in graph if not m.startswith("fastmsc.commands") and m != "fastmsc.cli"]
    reaching = {m: sorted(t for t in graph[m] if t.startswith("fastmsc.commands")) for m in library}
    assert {m: t for m, t in reaching.items() if t} == {}


# Files small enough to read in one sitting; the AOT tool's table formatting takes it just over the round number.
MAX_LINES = 460


def test_no_library_file_is_over_the_size_limit():
    sizes = {str(path.relative_to(PACKAGE.parent)): len(path.read_text(encoding="utf-8").splitlines())
             for path in PACKAGE.rglob("*.py")}
    assert {path: n for path, n in sizes.items() if n > MAX_LINES} == {}


def _registered_ops() -> list[str]:
    from fastmsc.backend import OPS

    return sorted(OPS)


@pytest.mark.parametrize("op", _registered_ops())
def test_every_op_has_its_parts_under_one_name(op):
    """ARCHITECTURE.md's table: the public op, its reference, its fused path, its tests and its benchmark cases
    carry the op's name."""
    from fastmsc.bench.cases import all_ops

    repo = PACKAGE.parent
    for part in (f"fastmsc/ops/{op}.py", f"fastmsc/ops/reference/{op}.py", f"fastmsc/kernels/{op}.py",
                 f"tests/test_{op}.py"):
        assert (repo / part).is_file(), f"{op}: {part} is missing"
    assert op in all_ops(), f"{op} has no benchmark cases in fastmsc/bench/cases.py"
    assert f"`{op}`" in (repo / "ARCHITECTURE.md").read_text(encoding="utf-8"), f"ARCHITECTURE.md does not name {op}"
