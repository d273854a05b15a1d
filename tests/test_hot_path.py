"""No host sync in the hot path outside functions that say so (`_sync_*`).

One scan for every hot package: list a directory or a module under src/moekit in HOT.
"""

import ast
from pathlib import Path

import pytest

import moekit

SRC = Path(moekit.__file__).parent
# what runs inside a forward pass or a decode step: directories (every .py below) or modules
HOT = [
    "routing",
    "backends",
    "parallel/expert_parallel.py",
    "parallel/comm.py",
    "dispatch.py",
    "layer.py",
    "replay.py",
    "experts.py",
    "librarian.py",
    "model",
    "serve",
    # what runs every training step: the step, the load-health counters, recompute, schedules
    "train/step.py",
    "train/health.py",
    "train/recompute.py",
    "train/schedules.py",
    "train/clock.py",
]
# serve modules that answer HTTP requests after a step: turning results into JSON is their job
COLD = {"serve/routes.py", "serve/stats.py"}
SYNCS = {"item", "tolist", "cpu", "nonzero"}


def _hot_files(name):
    path = SRC / name
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return [f for f in files if f.relative_to(SRC).as_posix() not in COLD]


def _violations(tree):
    def visit(node, inside_sync):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            inside_sync = inside_sync or node.name.startswith("_sync")
        if isinstance(node, ast.Attribute) and node.attr in SYNCS and not inside_sync:
            yield node.lineno, node.attr
        for child in ast.iter_child_nodes(node):
            yield from visit(child, inside_sync)

    yield from visit(tree, False)


@pytest.mark.parametrize("package", HOT)
def test_no_host_sync_in_hot_path(package):
    assert (SRC / package).exists(), f"HOT lists {package!r}, which is not under {SRC}"
    found = []
    for path in _hot_files(package):
        for line, attr in _violations(ast.parse(path.read_text())):
            found.append(f"{path.relative_to(SRC)}:{line} .{attr}()")
    assert not found, "host syncs outside _sync_* functions:\n" + "\n".join(found)


def test_the_scan_catches_a_sync():
    tree = ast.parse("def f(x):\n    return x.item()\ndef _sync_g(x):\n    return x.tolist()\n")
    assert list(_violations(tree)) == [(2, "item")]
