"""SQLite schema of a knowledge store and the small record types it returns."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

import torch

SCHEMA_VERSION = 1

# Expert links are stored as an inverted index (node_experts) rather than a materialised edge
# list: nodes sharing an expert form a clique, so an explicit edge table grows quadratically with
# the number of nodes. The `edges` view derives the same (src, dst, weight) rows on demand.
SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # AUTOINCREMENT: ids of evicted nodes are never handed out again.
    """CREATE TABLE IF NOT EXISTS nodes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        layer INTEGER,
        step INTEGER,
        embedding BLOB NOT NULL,
        metadata TEXT NOT NULL DEFAULT '{}',
        count INTEGER NOT NULL DEFAULT 1,
        hits INTEGER NOT NULL DEFAULT 0,
        last_used INTEGER NOT NULL
    )""",
    # Eviction order: least used first, then least recently used, then oldest id.
    "CREATE INDEX IF NOT EXISTS nodes_usage ON nodes (count + hits, last_used, id)",
    """CREATE TABLE IF NOT EXISTS node_experts (
        expert INTEGER NOT NULL,
        node_id INTEGER NOT NULL,
        PRIMARY KEY (expert, node_id)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS node_experts_by_node ON node_experts (node_id, expert)",
    """CREATE VIEW IF NOT EXISTS edges (src, dst, weight) AS
        SELECT a.node_id, b.node_id, COUNT(*) FROM node_experts AS a
        JOIN node_experts AS b ON b.expert = a.expert AND b.node_id != a.node_id
        GROUP BY a.node_id, b.node_id""",
]

EVICTION_ORDER = "SELECT id FROM nodes ORDER BY count + hits, last_used, id LIMIT ?"

NEIGHBORS = """
    SELECT b.node_id, COUNT(*) AS weight FROM node_experts AS a
    JOIN node_experts AS b ON b.expert = a.expert
    WHERE a.node_id = ? AND b.node_id != a.node_id
    GROUP BY b.node_id ORDER BY weight DESC, b.node_id LIMIT ?
"""


# PRAGMA takes no bound parameters, so the values it may be given are spelled out here.
PRAGMAS: dict[str, tuple[str, ...]] = {
    "page_size": ("16384",),
    "journal_mode": ("WAL",),
    "synchronous": ("NORMAL", "FULL"),
}


def set_pragma(con: sqlite3.Connection, name: str, value: str) -> Any:
    """Run `PRAGMA name=value` for an allow-listed pair; returns the first result cell, if any.

    The text sent to SQLite comes from `PRAGMAS`, never from the caller's string.
    """
    allowed = PRAGMAS.get(name)
    if allowed is None:
        raise ValueError(f"pragma: {name!r} is not one of {sorted(PRAGMAS)}")
    canonical = next((a for a in allowed if a == str(value).upper()), None)
    if canonical is None:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(allowed)}")
    row = con.execute(f"PRAGMA {name}={canonical}").fetchone()
    return None if row is None else row[0]


@dataclass(frozen=True, slots=True)
class Hit:
    """One query result; ``similarity`` is the cosine between the query and the node."""

    node_id: int
    similarity: float
    experts: tuple[int, ...]
    metadata: dict[str, Any]
    layer: int | None
    step: int | None
    count: int


@dataclass(frozen=True, slots=True, eq=False)
class Node:
    """Everything stored about one insight, as returned by ``KnowledgeStore.get``.

    ``count`` is how many adds were merged into the node, ``hits`` how often queries returned it
    and ``last_used`` the store's logical clock at its last add, merge or hit.
    """

    node_id: int
    embedding: torch.Tensor  # [D] float32, as first added (merges do not move it)
    experts: tuple[int, ...]
    metadata: dict[str, Any]
    layer: int | None
    step: int | None
    count: int
    hits: int
    last_used: int

    @property
    def usage(self) -> int:
        """The eviction score: nodes with the lowest usage are evicted first."""
        return self.count + self.hits
