"""Imports point downward: the layer's packages never import the model, trainer or server."""

import ast
from pathlib import Path

import moekit

SRC = Path(moekit.__file__).parent
LOW = [
    "routing",
    "backends",
    "dispatch.py",
    "layer.py",
    "replay.py",
    "experts.py",
    "config.py",
    "librarian.py",
]
HIGH = (
    "moekit.model",
    "moekit.train",
    "moekit.serve",
    "moekit.tasks",
    "moekit.viz",
    "moekit.integrations",
)


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_low_level_packages_do_not_import_high_level_ones():
    bad = []
    for name in LOW:
        path = SRC / name
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            bad += [f"{file.relative_to(SRC)}: {m}" for m in _imports(file) if m.startswith(HIGH)]
    assert not bad, "\n".join(bad)
