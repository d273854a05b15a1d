"""SQL reads that turn stored rows into the store's record types."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import torch

from moekit.memory._schema import Node

# Id lists travel as one JSON parameter, so the statement text never depends on the input.
EXPERTS_OF = (
    "SELECT node_id, expert FROM node_experts"
    " WHERE node_id IN (SELECT value FROM json_each(?)) ORDER BY node_id, expert"
)
ROWS_OF = (
    "SELECT id, layer, step, metadata, count FROM nodes"
    " WHERE id IN (SELECT value FROM json_each(?))"
)


def fetch_rows(con: sqlite3.Connection, ids: set[int]) -> dict[int, tuple]:
    """(experts, metadata, layer, step, count) of each id, in two indexed queries."""
    id_list = json.dumps(sorted(int(i) for i in ids))
    experts: dict[int, list[int]] = {i: [] for i in ids}
    for node_id, expert in con.execute(EXPERTS_OF, (id_list,)):
        experts[node_id].append(expert)
    return {
        node_id: (tuple(experts[node_id]), json.loads(md), layer, step, count)
        for node_id, layer, step, md, count in con.execute(ROWS_OF, (id_list,))
    }


def fetch_node(con: sqlite3.Connection, node_id: int) -> Node | None:
    """Everything stored about one node, or None if there is no such node."""
    row = con.execute(
        "SELECT layer, step, embedding, metadata, count, hits, last_used FROM nodes WHERE id = ?",
        (int(node_id),),
    ).fetchone()
    if row is None:
        return None
    layer, step, blob, md, count, hits, last_used = row
    experts = con.execute(
        "SELECT expert FROM node_experts WHERE node_id = ? ORDER BY expert", (int(node_id),)
    ).fetchall()
    emb_D = torch.from_numpy(np.frombuffer(blob, dtype="<f4").astype(np.float32))
    return Node(
        int(node_id),
        emb_D,
        tuple(e for (e,) in experts),
        json.loads(md),
        layer,
        step,
        count,
        hits,
        last_used,
    )
