"""Imports point down the floors of docs/architecture.md, imports inside functions included.

    1 types    leaf modules that import nothing from moekit
    2 core     config, routing/, dispatch, experts, backends/, layer, reference*, replay, ...
    3 model    transformer, attention, caches, checkpoint store, text codec
    4 uses     tasks/ train/ serve/ integrations/ parallel/ memory/  (not each other)
    5 views    viz/
    6 entry    bench/ cli commands demos ...

Nothing imports the top-level `moekit` package: its __init__ only re-exports. Every import
counts wherever it stands: inside functions and under `TYPE_CHECKING` too.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import moekit

SRC = Path(moekit.__file__).parent
FLOORS: dict[str, int] = {
    **dict.fromkeys(["types", "errors", "progress"], 1),
    **dict.fromkeys(
        [
            "config",
            "routing",
            "dispatch",
            "experts",
            "backends",
            "layer",
            "reference",
            "reference_routing",
            "replay",
            "librarian",
            "ranges",
        ],
        2,
    ),
    "model": 3,
    **dict.fromkeys(["tasks", "train", "serve", "integrations", "parallel", "memory"], 4),
    "viz": 5,
    **dict.fromkeys(
        [
            "bench",
            "cli",
            "commands",
            "demos",
            "sweep",
            "system",
            "profiling",
            "__main__",
        ],
        6,
    ),
}

# Floor-4 packages use each other only through these public entry points, each for a reason;
# any other crossing fails. Each entry is "file: imported.module".
CROSSINGS: dict[str, str] = {
    "tasks/finance/model.py: moekit.train.step": "the forecaster trains through the one step",
    "train/trainer.py: moekit.tasks": "Trainer(cfg) builds the built-in task cfg.task names",
    "train/parallelism.py: moekit.parallel": "a run composes expert and data parallelism",
    "train/parallelism.py: moekit.parallel.checkpoint": "and their sharded checkpoint I/O",
    "train/parallelism.py: moekit.parallel.data_parallel": "(parallel imports nothing of train)",
}
# Edges that still climb a floor, each "file: imported.module"; an entry that no longer occurs
# fails the test, so the list never outlives its edge.
KNOWN_VIOLATIONS: set[str] = set()


def _module_name(file: Path, root: Path = SRC) -> str:
    parts = list(file.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def _modules(root: Path = SRC) -> dict[str, Path]:
    return {_module_name(f, root): f for f in sorted(root.rglob("*.py"))}


def _imports(file: Path, root: Path = SRC) -> set[str]:
    """Every moekit module `file` imports, anywhere in it; `from a import b` names a.b when
    b is a module, relative imports resolved."""
    modules = _modules(root)
    package = _module_name(file, root).split(".")
    if file.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "moekit"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package[: len(package) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            if base.split(".")[0] != "moekit":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return found - {_module_name(file, root)}


def _floor(module: str) -> tuple[int, str]:
    """(floor, the top-level part it belongs to) of a moekit module."""
    top = module.split(".")[1] if "." in module else ""
    if top not in FLOORS:
        raise AssertionError(f"{module}: no floor given in tests/test_layering.py")
    return FLOORS[top], top


def _violations() -> set[str]:
    bad = set()
    for name, file in _modules().items():
        if name == "moekit":
            continue  # the package's __init__ re-exports the public names
        floor, top = _floor(name)
        for imported in _imports(file):
            edge = f"{file.relative_to(SRC)}: {imported}"
            if imported == "moekit":
                bad.add(edge)
                continue
            other, other_top = _floor(imported)
            if other > floor or (other == floor == 4 and other_top != top):
                bad.add(edge)
    return bad


def test_imports_point_down_the_floors():
    found = _violations() - CROSSINGS.keys()
    new = sorted(found - KNOWN_VIOLATIONS)
    assert not new, "imports that climb a floor or cross floor 4:\n" + "\n".join(new)


def test_known_violations_are_not_stale():
    stale = sorted((KNOWN_VIOLATIONS | CROSSINGS.keys()) - _violations())
    assert not stale, "no longer occur, remove from KNOWN_VIOLATIONS:\n" + "\n".join(stale)
    assert not KNOWN_VIOLATIONS, "every import points down the floors: keep it so"


def test_every_module_has_a_floor():
    for name in _modules():
        if name != "moekit":
            _floor(name)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
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


# Import circles that remain on this branch (sorted member lists); emptied like the list above.
KNOWN_CYCLES: list[list[str]] = []


def test_import_graph_has_no_cycles():
    modules = _modules()
    edges = {name: _imports(file) & modules.keys() for name, file in modules.items()}
    found = sorted(_cycles(edges))
    assert found == sorted(KNOWN_CYCLES), "import circles:\n" + "\n".join(map(str, found))


def test_cycle_finder_sees_a_circle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]


def test_imports_are_found_inside_functions_and_relative_ones_resolved(tmp_path):
    root = tmp_path / "moekit"
    (root / "train").mkdir(parents=True)
    for name in ("__init__.py", "viz.py", "train/__init__.py", "train/step.py"):
        (root / name).write_text("")
    (root / "train" / "trainer.py").write_text(
        "from . import step\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import moekit\n"
        "def plot():\n    from ..viz import figure\n"
    )
    found = _imports(root / "train" / "trainer.py", root)
    assert found == {"moekit", "moekit.train.step", "moekit.viz"}
