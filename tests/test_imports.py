"""The package's imports can be drawn: no cycles, and no module imports from a layer above its own (a library
module never imports a stage, the pipeline or a tool). Parsed from the source, so a lazy import inside a function
counts like any other; imports under ``if TYPE_CHECKING:`` do not (they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gsae"

LAYERS = (
    ("base", ("gsae.paths", "gsae.distributed", "gsae.progress", "gsae.io", "gsae.typed_yaml", "gsae.config",
              "gsae.runtime")),
    ("core", ("gsae.sae", "gsae.arms", "gsae.lm", "gsae.models", "gsae.data", "gsae.openwebtext", "gsae.harvest",
              "gsae.reader", "gsae.train", "gsae.evals", "gsae.steering", "gsae.probing", "gsae.specs",
              "gsae.release")),
    ("analysis", ("gsae.analysis",)),
    ("stages", ("gsae.stages",)),
    ("entry", ("gsae.pipeline", "gsae.tools", "gsae")),
)
"""Each module's layer is that of the longest prefix listed; a module may import its own layer and those before."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(f): f for f in sorted(root.rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Import nodes that run (skipping ``if TYPE_CHECKING:`` bodies)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            yield from (n for child in node.orelse for n in _imports(ast.Module(body=[child], type_ignores=[])))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports (``from P import X`` counts as P.X when X is a module, else P)."""
    out: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in mods}
                continue
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else (node.module or "")
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in mods:
                    targets.add(sub)
                elif base in mods:
                    targets.add(base)
        out[name] = targets - {name}
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(name: str) -> int:
    best, level = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for pre in prefixes:
            if (name == pre or name.startswith(pre + ".")) and len(pre) > best:
                best, level = len(pre), i
    assert level is not None, f"{name} has no layer in tests/test_imports.py LAYERS; add it"
    return level


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
                  for a, targets in graph.items() for b in targets if layer(b) > layer(a))


def test_the_package_has_no_import_cycle():
    assert cycles(edges(modules())) == []


def test_no_module_imports_from_a_layer_above_its_own():
    assert upward(edges(modules())) == []


def test_no_module_is_over_500_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 500}
    assert long == {}


def test_the_checker_finds_a_planted_cycle_and_an_upward_import(tmp_path):
    pkg = tmp_path / "gsae"
    (pkg / "stages").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "io.py").write_text("from .stages import train\n")  # base -> stages: upward
    (pkg / "stages" / "__init__.py").write_text("")
    (pkg / "stages" / "train.py").write_text("from .. import io\nfrom typing import TYPE_CHECKING\n"
                                             "if TYPE_CHECKING:\n    from ..sae import X\n")
    (pkg / "sae.py").write_text("")
    mods = {module_name_in(tmp_path, f): f for f in sorted(pkg.rglob("*.py"))}
    graph = edges(mods)
    assert graph["gsae.stages.train"] == {"gsae.io"}  # the TYPE_CHECKING import does not count
    assert cycles(graph) == [["gsae.io", "gsae.stages.train"]]
    assert upward(graph) == ["gsae.io (base) imports gsae.stages.train (stages)"]


def module_name_in(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("name", ["gsae.analysis.ledger", "gsae.stages.train", "gsae.tools.bench"])
def test_every_module_has_a_layer(name):
    assert 0 <= layer(name) < len(LAYERS)
