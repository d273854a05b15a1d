"""KnowledgeStore: a persistent, deduplicating memory of expert insights backed by SQLite.

An insight is an embedding plus the set of experts that handled it, a layer, a step and JSON
metadata. Vectors live in SQLite as float32 blobs and, unit-normalised, in an in-memory cache
that answers exact cosine queries with batched matmuls; the database is only read for the few
rows a query returns. Every write is one SQLite transaction (WAL journal), so a crash loses at
most the write in flight.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moekit.memory import _validate as v
from moekit.memory._index import NO_LAYER, VectorCache, faiss_available
from moekit.memory._plan import Item, plan_batch
from moekit.memory._reads import fetch_node, fetch_rows
from moekit.memory._schema import (
    EVICTION_ORDER,
    NEIGHBORS,
    PRAGMAS,
    SCHEMA,
    SCHEMA_VERSION,
    Hit,
    Node,
    set_pragma,
)

COS_TOL = 1e-6  # float32 slack when comparing a cosine with dedup_threshold
_INDEXES = ("auto", "torch", "faiss")
_SYNC_MODES = tuple(m.lower() for m in PRAGMAS["synchronous"])


class KnowledgeStore:
    """Persistent memory of (embedding, experts, layer, step, metadata) insights.

    Dedup scope: an insight with a layer merges only into nodes of the same layer; one without a
    layer (``layer=None``) merges into the nearest node of any layer. Not thread-safe; several
    processes may share a file (writes are serialised by SQLite, and each store reloads its cache
    when it sees another connection's commit).

    ``index``: "torch" (exact, batched matmul), "faiss" (exact flat index, needs faiss) or
    "auto" (faiss when importable). ``synchronous``: "normal" survives a process crash (kill -9),
    "full" also survives power loss at the cost of an fsync per write.
    """

    def __init__(
        self,
        path: str | Path,
        dim: int,
        dedup_threshold: float = 0.85,
        max_nodes: int | None = None,
        *,
        index: str = "auto",
        synchronous: str = "normal",
    ) -> None:
        self.dim: int = v.check_int("dim", dim, minimum=1)
        self.dedup_threshold = v.check_threshold(dedup_threshold)
        self.max_nodes: int | None = v.check_int("max_nodes", max_nodes, minimum=1, allow_none=True)
        if index not in _INDEXES:
            raise ValueError(f"index must be one of {_INDEXES}, got {index!r}")
        if synchronous not in _SYNC_MODES:
            raise ValueError(f"synchronous must be one of {_SYNC_MODES}, got {synchronous!r}")
        self._use_faiss = index == "faiss" or (index == "auto" and faiss_available())
        self.path = Path(path)
        self._con: sqlite3.Connection | None = sqlite3.connect(
            str(self.path), timeout=60.0, isolation_level=None
        )
        try:
            self._open(synchronous)
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- lifecycle
    def _open(self, synchronous: str) -> None:
        con = self._db
        # Only takes effect on a new file: 16 KiB pages pack several float32 rows of a few hundred
        # dims per page (4 KiB pages would hold one 2 KiB row each).
        set_pragma(con, "page_size", "16384")
        mode = set_pragma(con, "journal_mode", "WAL")
        if mode.lower() != "wal":
            raise ValueError(f"path: could not enable WAL journaling (got {mode!r})")
        set_pragma(con, "synchronous", synchronous)
        with self._write():
            for stmt in SCHEMA:
                con.execute(stmt)
            con.execute("INSERT OR IGNORE INTO meta VALUES ('dim', ?)", (str(self.dim),))
            con.execute("INSERT OR IGNORE INTO meta VALUES ('version', ?)", (str(SCHEMA_VERSION),))
            stored = int(con.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()[0])
        if stored != self.dim:
            raise ValueError(f"dim={self.dim} does not match the store's dim={stored}")
        self._load()

    def _load(self) -> None:
        """(Re)build the vector cache and logical clock from the database."""
        con = self._db
        self._data_version = con.execute("PRAGMA data_version").fetchone()[0]
        cache = VectorCache(self.dim, use_faiss=self._use_faiss)
        cur = con.execute("SELECT id, layer, embedding FROM nodes ORDER BY id")
        while rows := cur.fetchmany(65_536):
            raw = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4")
            emb_ND = torch.from_numpy(raw.astype(np.float32).reshape(len(rows), self.dim))
            layers = [NO_LAYER if r[1] is None else r[1] for r in rows]
            cache.append([r[0] for r in rows], layers, v.normalise(emb_ND))
        self._cache = cache
        self._clock: int = con.execute("SELECT COALESCE(MAX(last_used), 0) FROM nodes").fetchone()[
            0
        ]

    def _sync(self) -> None:
        """Reload the cache if another connection committed since we last looked."""
        if self._db.execute("PRAGMA data_version").fetchone()[0] != self._data_version:
            self._load()

    def close(self) -> None:
        """Close the database; further calls raise ValueError. Safe to call twice."""
        if self._con is not None:
            self._con.close()
            self._con = None

    def __enter__(self) -> KnowledgeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _db(self) -> sqlite3.Connection:
        if self._con is None:
            raise ValueError("operation on a closed KnowledgeStore")
        return self._con

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; rolled back on any error."""
        con = self._db
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    def __len__(self) -> int:
        self._sync()
        return len(self._cache)

    def __contains__(self, node_id: object) -> bool:
        self._sync()
        return isinstance(node_id, int) and node_id in self._cache

    def __repr__(self) -> str:
        state = "closed" if self._con is None else f"{len(self._cache)} nodes"
        return f"KnowledgeStore({str(self.path)!r}, dim={self.dim}, {state})"

    # ---------------------------------------------------------------- writes
    def add(
        self,
        embedding: Any,
        experts: Iterable[int],
        layer: int | None = None,
        step: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> int:
        """Store one insight, or merge it into its nearest node when cosine >= dedup_threshold.

        A merge increments the node's count, unions its experts, shallow-merges metadata (new keys
        win) and marks it used; its embedding, layer and step stay as first stored. Returns the id.
        """
        x_1D = v.as_matrix("embedding", embedding, self.dim, batched=False)
        item = (
            v.check_experts(experts),
            v.check_int("layer", layer, minimum=0, allow_none=True),
            v.check_int("step", step, minimum=0, allow_none=True),
            v.check_metadata(metadata),
        )
        return self._write_batch(x_1D, [item], dedup=True)[0]

    def add_many(
        self,
        embeddings: Any,
        experts: Sequence[Iterable[int]],
        layers: int | None | Sequence[int | None] = None,
        steps: int | None | Sequence[int | None] = None,
        metadata: dict[str, Any] | None | Sequence[dict[str, Any] | None] = None,
        *,
        dedup: bool = True,
    ) -> list[int]:
        """Add N insights in one transaction; same result as N ``add`` calls in order.

        ``layers``/``steps``/``metadata`` are a scalar for all rows or one value per row. With
        ``dedup=False`` every row becomes a new node (fast bulk load). Eviction, if any, runs once
        at the end of the batch.
        """
        x_ND = v.as_matrix("embeddings", embeddings, self.dim, batched=True)
        n = x_ND.shape[0]
        if isinstance(experts, torch.Tensor | np.ndarray):
            experts = experts.tolist()
        if not isinstance(experts, Sequence) or len(experts) != n:
            raise ValueError(f"experts must be a sequence of {n} expert collections")
        items = [
            (
                v.check_experts(e),
                v.check_int("layers", lay, minimum=0, allow_none=True),
                v.check_int("steps", st, minimum=0, allow_none=True),
                v.check_metadata(md),
            )
            for e, lay, st, md in zip(
                experts,
                v.per_item("layers", layers, n),
                v.per_item("steps", steps, n),
                v.per_item("metadata", metadata, n),
                strict=True,
            )
        ]
        return self._write_batch(x_ND, items, dedup=dedup)

    def _write_batch(self, x_ND: torch.Tensor, items: list[Item], dedup: bool) -> list[int]:
        unit_ND = v.normalise(x_ND)
        layers_N = torch.tensor([NO_LAYER if it[1] is None else it[1] for it in items])
        with self._write() as con:
            self._sync()
            tick0 = self._clock
            new, merged, targets = plan_batch(
                self._cache, unit_ND, layers_N, items, dedup, self.dedup_threshold - COS_TOL, tick0
            )
            seq = con.execute("SELECT seq FROM sqlite_sequence WHERE name = 'nodes'").fetchone()
            first = (seq[0] if seq else 0) + 1
            new_ids = list(range(first, first + len(new)))
            blobs_ND = np.asarray(x_ND.numpy(), dtype="<f4")  # no copy on little-endian
            con.executemany(
                "INSERT INTO nodes (id, layer, step, embedding, metadata, count, last_used)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        i,
                        p.layer,
                        p.step,
                        blobs_ND[p.src].tobytes(),
                        json.dumps(p.metadata),
                        p.count,
                        p.tick,
                    )
                    for i, p in zip(new_ids, new, strict=True)
                ],
            )
            links = [(e, i) for i, p in zip(new_ids, new, strict=True) for e in p.experts]
            for node_id, p in merged.items():
                (old,) = con.execute(
                    "SELECT metadata FROM nodes WHERE id = ?", (node_id,)
                ).fetchone()
                md = {**json.loads(old), **p.metadata}
                con.execute(
                    "UPDATE nodes SET count = count + ?, last_used = ?, metadata = ? WHERE id = ?",
                    (p.count, p.tick, json.dumps(md), node_id),
                )
                links.extend((e, node_id) for e in p.experts)
            con.executemany("INSERT OR IGNORE INTO node_experts VALUES (?, ?)", links)
            evicted = self._evict(con, len(new), set(new_ids) | set(merged))
        # Committed: mirror the change in the cache.
        self._cache.append(
            new_ids,
            [NO_LAYER if p.layer is None else p.layer for p in new],
            unit_ND[[p.src for p in new]],
        )
        self._cache.remove(evicted)
        self._clock = tick0 + len(items)
        return [new_ids[t] if is_new else t for is_new, t in targets]

    def _evict(self, con: sqlite3.Connection, n_new: int, touched: set[int]) -> list[int]:
        """Delete the least-used nodes beyond max_nodes; nodes touched by this write go last."""
        excess = len(self._cache) + n_new - (self.max_nodes or 0)
        if self.max_nodes is None or excess <= 0:
            return []
        cand = [r[0] for r in con.execute(EVICTION_ORDER, (excess + len(touched),))]
        evicted = [c for c in cand if c not in touched][:excess]
        if len(evicted) < excess:  # the batch alone overflows max_nodes
            evicted += [c for c in cand if c in touched][: excess - len(evicted)]
        con.executemany("DELETE FROM nodes WHERE id = ?", [(i,) for i in evicted])
        con.executemany("DELETE FROM node_experts WHERE node_id = ?", [(i,) for i in evicted])
        return evicted

    # ---------------------------------------------------------------- reads
    def query(
        self, embedding: Any, top_k: int = 5, *, layer: int | None = None, track: bool = True
    ) -> list[Hit]:
        """The ``top_k`` nodes most cosine-similar to ``embedding``, best first.

        ``layer`` restricts the search to one layer. With ``track`` (default) every returned node
        gets a hit and is marked used, which protects it from eviction.
        """
        q_1D = v.as_matrix("embedding", embedding, self.dim, batched=False)
        return self._query(q_1D, top_k, layer, track)[0]

    def query_many(
        self, embeddings: Any, top_k: int = 5, *, layer: int | None = None, track: bool = True
    ) -> list[list[Hit]]:
        """``query`` for a batch of embeddings [Q, dim], searched with one matmul per chunk."""
        q_QD = v.as_matrix("embeddings", embeddings, self.dim, batched=True)
        return self._query(q_QD, top_k, layer, track)

    def _query(self, q_QD: torch.Tensor, top_k: int, layer: Any, track: bool) -> list[list[Hit]]:
        top_k = v.check_int("top_k", top_k, minimum=1)
        layer = v.check_int("layer", layer, minimum=0, allow_none=True)
        self._sync()
        unit_QD = v.normalise(q_QD)
        layers_Q = torch.full((q_QD.shape[0],), NO_LAYER if layer is None else layer)
        _, ids_QK = self._cache.search(unit_QD, top_k, layers_Q)
        per_query = [[i for i in row if i >= 0] for row in ids_QK.tolist()]
        rows = fetch_rows(self._db, {i for ids in per_query for i in ids})
        out = []
        for q, ids in enumerate(per_query):
            # Report cosines in float64 so they do not depend on where a row sits in the cache.
            sims = (
                torch.stack([self._cache.unit(i) for i in ids]).double() @ unit_QD[q].double()
                if ids
                else torch.empty(0)
            )
            hits = [Hit(i, float(s), *rows[i]) for i, s in zip(ids, sims.tolist(), strict=True)]
            out.append(sorted(hits, key=lambda h: (-h.similarity, h.node_id)))
        if track and rows:
            tick0 = self._clock
            with self._write() as con:
                con.executemany(
                    "UPDATE nodes SET hits = hits + 1, last_used = ? WHERE id = ?",
                    [(tick0 + q + 1, i) for q, ids in enumerate(per_query) for i in ids],
                )
            self._clock = tick0 + len(per_query)
        return out

    def get(self, node_id: int) -> Node | None:
        """Everything stored about one node, or None if there is no such node."""
        return fetch_node(self._db, int(node_id))

    def neighbors(self, node_id: int, limit: int | None = None) -> list[tuple[int, int]]:
        """Nodes sharing at least one expert with ``node_id`` as (id, shared experts), heaviest
        first (ties by id). Raises KeyError for an unknown node."""
        limit = v.check_int("limit", limit, minimum=1, allow_none=True)
        if self._db.execute("SELECT 1 FROM nodes WHERE id = ?", (int(node_id),)).fetchone() is None:
            raise KeyError(node_id)
        rows = self._db.execute(NEIGHBORS, (int(node_id), -1 if limit is None else limit))
        return [(int(a), int(w)) for a, w in rows]
