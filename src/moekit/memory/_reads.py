"""SQL reads that turn stored rows into the store's record types."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import torch

from moekit.memory._schema import Node


def fetch_rows(con: sqlite3.Connection, ids: set[int]) -> dict[int, tuple]:
    """(experts, metadata, layer, step, count) of each id, in two indexed queries."""
    out: dict[int, tuple] = {}
    experts: dict[int, list[int]] = {i: [] for i in ids}
    id_list = sorted(ids)
    for start in range(0, len(id_list), 500):
        chunk = id_list[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for node_id, expert in con.execute(
            f"SELECT node_id, expert FROM node_experts WHERE node_id IN ({marks})"
            " ORDER BY node_id, expert",
            chunk,
        ):
            experts[node_id].append(expert)
        for node_id, layer, step, md, count in con.execute(
            f"SELECT id, layer, step, metadata, count FROM nodes WHERE id IN ({marks})", chunk
        ):
            out[node_id] = (tuple(experts[node_id]), json.loads(md), layer, step, count)
    return out


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
