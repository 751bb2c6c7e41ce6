"""The package's shape (docs/architecture.md): an import graph without cycles, the training
package imported only by the trainer's own entry point, and files small enough to read."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "megatron_m2"
MAX_LINES = 600
TRAINING_IMPORTERS = {"megatron_m2.cli.pretrain", "megatron_m2.pretrain"}
"""Modules outside ``megatron_m2.training`` allowed to import it: m2-pretrain's front end and
its ``python -m megatron_m2.pretrain`` alias."""


def _modules():
    mods = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        mods[name] = path
    return mods


def _imports(mods):
    """Module → the package modules it imports (at any depth: lazy and type-only imports
    included)."""
    edges = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    if f"{target}.{alias.name}" in mods:
                        targets.add(f"{target}.{alias.name}")
                    elif target in mods:
                        targets.add(target)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name in mods)
        targets.discard(name)
        edges[name] = targets
    return edges


def _cycles(edges):
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_import_graph_has_no_cycle():
    assert _cycles(_imports(_modules())) == []


def test_cycle_detection_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_trainer_imports_training():
    edges = _imports(_modules())
    outside = {m: sorted(t for t in targets if t.startswith("megatron_m2.training"))
               for m, targets in edges.items()
               if not m.startswith("megatron_m2.training") and m not in TRAINING_IMPORTERS}
    assert {m: t for m, t in outside.items() if t} == {}


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.name))
def test_files_stay_readable(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT.parent)}: {lines} lines"
