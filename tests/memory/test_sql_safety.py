"""The knowledge store's SQL: statements are fixed text, values are bound, PRAGMAs allow-listed."""

from __future__ import annotations

import ast
import sqlite3
from pathlib import Path

import pytest
import torch

import moekit.memory
from moekit.memory import KnowledgeStore
from moekit.memory._schema import PRAGMAS, set_pragma

HOSTILE = "'); DROP TABLE nodes; --"
MEMORY_SRC = Path(moekit.memory.__file__).parent


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as con:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


@pytest.mark.parametrize(
    ("name", "value", "named"),
    [
        ("synchronous", "OFF; DROP TABLE nodes", "synchronous"),
        ("synchronous", "OFF", "synchronous"),  # a real value, but not an allowed one
        ("journal_mode", "DELETE", "journal_mode"),
        ("page_size", "16384; DROP TABLE nodes", "page_size"),
        ("foreign_keys=ON; DROP TABLE nodes; --", "ON", "pragma"),
    ],
)
def test_hostile_pragma_is_refused_and_nothing_runs(tmp_path, name, value, named):
    path = tmp_path / "kb.sqlite"
    KnowledgeStore(path, dim=4).close()
    with sqlite3.connect(path) as con:
        before = con.execute("PRAGMA synchronous").fetchone()[0]
        with pytest.raises(ValueError, match=named):
            set_pragma(con, name, value)
        assert con.execute("PRAGMA synchronous").fetchone()[0] == before
    assert {"nodes", "node_experts", "meta"} <= _tables(path)


def test_allowed_pragma_takes_the_allow_listed_spelling(tmp_path):
    with sqlite3.connect(tmp_path / "x.sqlite") as con:
        set_pragma(con, "synchronous", "full")
        assert con.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert PRAGMAS["synchronous"] == ("NORMAL", "FULL")


def test_store_refuses_a_hostile_synchronous_value(tmp_path):
    with pytest.raises(ValueError, match="synchronous"):
        KnowledgeStore(tmp_path / "kb.sqlite", dim=4, synchronous="normal; DROP TABLE nodes")


class _Recording:
    """A connection that records the statement text of every execute / executemany."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self._con, self.statements = con, []

    def execute(self, sql: str, *args):
        self.statements.append(sql)
        return self._con.execute(sql, *args)

    def executemany(self, sql: str, *args):
        self.statements.append(sql)
        return self._con.executemany(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self._con, name)


def test_user_values_never_reach_the_statement_text(tmp_path):
    path = tmp_path / "kb.sqlite"
    store = KnowledgeStore(path, dim=4, max_nodes=2)
    rec = _Recording(store._con)
    store._con = rec  # type: ignore[assignment]
    md = {HOSTILE: HOSTILE}
    a = store.add(torch.tensor([1.0, 0, 0, 0]), [1], layer=0, step=3, metadata=md)
    store.add_many(torch.eye(4)[1:], [[2], [3], [1]], metadata=[md, None, md], dedup=False)
    hits = store.query(torch.tensor([0.0, 0, 0, 1]), top_k=3)
    store.neighbors(hits[0].node_id)
    store.get(a)
    store._con = rec._con
    store.close()
    assert len(rec.statements) > 10
    assert not [s for s in rec.statements if HOSTILE in s]
    assert hits[0].metadata == md  # stored as data, read back unchanged
    assert {"nodes", "node_experts", "meta"} <= _tables(path)


def _sql_argument_is_built(call: ast.Call) -> bool:
    """True when the SQL of an execute call is assembled at run time (f-string, +, %, format)."""
    if not call.args:
        return False
    sql = call.args[0]
    built = isinstance(sql, ast.JoinedStr | ast.BinOp)
    return built or (isinstance(sql, ast.Call) and getattr(sql.func, "attr", "") == "format")


def test_every_statement_text_is_fixed_outside_the_pragma_helper():
    built, seen = [], 0
    for file in sorted(MEMORY_SRC.glob("*.py")):
        tree = ast.parse(file.read_text())
        allowed = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef) and f.name == "set_pragma"
            for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            is_exec = isinstance(node, ast.Call) and getattr(node.func, "attr", "") in (
                "execute",
                "executemany",
            )
            seen += is_exec
            if is_exec and id(node) not in allowed and _sql_argument_is_built(node):
                built.append(f"{file.name}:{node.lineno}")
    assert built == [] and seen > 15
