"""The model's forward and decoding paths never synchronise with the host."""

import ast
from pathlib import Path

import moekit.model

SRC = Path(moekit.model.__file__).parent
SYNCS = {"item", "tolist", "cpu", "nonzero"}


def test_model_package_has_no_host_sync():
    found = []
    for path in sorted(SRC.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in SYNCS:
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert not found, found
