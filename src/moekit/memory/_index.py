"""In-memory exact cosine index over the store's unit-normalised embeddings.

The store keeps this cache in step with SQLite so that queries never read the database for
vectors. Rows are unordered (removal swaps the last row into the hole, O(D) per node), so callers
must only rely on node ids, never on row positions.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch

NO_LAYER = -1  # layer value for nodes (or queries) without a layer


class VectorCache:
    """Unit embeddings, node ids and layers of every node, with chunked top-k search."""

    def __init__(self, dim: int, use_faiss: bool = False) -> None:
        self.dim = dim
        self._n = 0
        self._unit_CD = torch.empty(0, dim)  # [capacity, D] float32, rows [:n] valid
        self._ids_C = torch.empty(0, dtype=torch.int64)  # [capacity]
        self._layers_C = torch.empty(0, dtype=torch.int64)  # [capacity], NO_LAYER for None
        self._row: dict[int, int] = {}
        self._faiss: Any = importlib.import_module("faiss") if use_faiss else None
        self._faiss_index: Any = None  # mirrors rows [:n] while not None

    def __len__(self) -> int:
        return self._n

    def __contains__(self, node_id: int) -> bool:
        return node_id in self._row

    def ids(self) -> list[int]:
        return self._ids_C[: self._n].tolist()

    def unit(self, node_id: int) -> torch.Tensor:
        """The stored unit vector of one node, [D]."""
        return self._unit_CD[self._row[node_id]]

    def append(self, ids: list[int], layers: list[int], unit_ND: torch.Tensor) -> None:
        """Add rows; capacity doubles so a stream of single appends is amortised O(D)."""
        m = len(ids)
        if m == 0:
            return
        need = self._n + m
        if need > self._unit_CD.shape[0]:
            cap = max(need, 2 * self._unit_CD.shape[0], 64)
            self._unit_CD = _grow(self._unit_CD, cap, self._n)
            self._ids_C = _grow(self._ids_C, cap, self._n)
            self._layers_C = _grow(self._layers_C, cap, self._n)
        sl = slice(self._n, need)
        self._unit_CD[sl] = unit_ND
        self._ids_C[sl] = torch.tensor(ids, dtype=torch.int64)
        self._layers_C[sl] = torch.tensor(layers, dtype=torch.int64)
        for i, node_id in enumerate(ids):
            self._row[node_id] = self._n + i
        self._n = need
        if self._faiss_index is not None:
            self._faiss_index.add(unit_ND.numpy())

    def remove(self, ids: list[int]) -> None:
        """Drop rows by node id (unknown ids are ignored)."""
        for node_id in ids:
            row = self._row.pop(node_id, None)
            if row is None:
                continue
            last = self._n - 1
            if row != last:
                self._unit_CD[row] = self._unit_CD[last]
                self._ids_C[row] = self._ids_C[last]
                self._layers_C[row] = self._layers_C[last]
                self._row[int(self._ids_C[row])] = row
            self._n = last
            self._faiss_index = None  # row order changed: rebuild lazily

    def search(
        self, q_QD: torch.Tensor, k: int, layers_Q: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k cosine neighbours per query among nodes in each query's layer scope.

        q_QD: [Q, D] unit queries; layers_Q: [Q], NO_LAYER = search every layer, otherwise only
        nodes of that layer. Returns (sims_QK, ids_QK) with K = min(k, n); slots without a match
        hold sim = -inf and id = -1.
        """
        n, nq = self._n, q_QD.shape[0]
        kk = min(k, n)
        if kk == 0:
            return torch.empty(nq, 0), torch.empty(nq, 0, dtype=torch.int64)
        if self._faiss is not None and bool((layers_Q == NO_LAYER).all()):
            return self._search_faiss(q_QD, kk)
        best_sims_QK = torch.full((nq, 0), float("-inf"))
        best_rows_QK = torch.empty(nq, 0, dtype=torch.int64)
        filtered_Q1 = (layers_Q != NO_LAYER).unsqueeze(1)  # [Q, 1]
        chunk = max(65_536, (1 << 24) // max(nq, 1))  # keeps the [Q, chunk] score block small
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            scores_QC = q_QD @ self._unit_CD[start:stop].T  # [Q, C]
            if bool(filtered_Q1.any()):
                other_QC = self._layers_C[start:stop].unsqueeze(0) != layers_Q.unsqueeze(1)
                scores_QC.masked_fill_(filtered_Q1 & other_QC, float("-inf"))
            sims_QK, rows_QK = scores_QC.topk(min(kk, stop - start), dim=1)
            best_sims_QK = torch.cat([best_sims_QK, sims_QK], dim=1)
            best_rows_QK = torch.cat([best_rows_QK, rows_QK + start], dim=1)
            if best_sims_QK.shape[1] > kk:
                best_sims_QK, pick_QK = best_sims_QK.topk(kk, dim=1)
                best_rows_QK = best_rows_QK.gather(1, pick_QK)
        ids_QK = self._ids_C[best_rows_QK]
        ids_QK[torch.isinf(best_sims_QK)] = -1
        return best_sims_QK, ids_QK

    def _search_faiss(self, q_QD: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Unfiltered search through a faiss flat inner-product index (exact, as torch)."""
        if self._faiss_index is None:
            index = self._faiss.IndexFlatIP(self.dim)
            index.add(np.ascontiguousarray(self._unit_CD[: self._n].numpy()))
            self._faiss_index = index
        sims, rows = self._faiss_index.search(np.ascontiguousarray(q_QD.numpy()), k)
        rows_QK = torch.from_numpy(rows).long()
        ids_QK = torch.where(rows_QK >= 0, self._ids_C[rows_QK.clamp(min=0)], -1)
        return torch.from_numpy(sims).float(), ids_QK


def _grow(t: torch.Tensor, cap: int, n: int) -> torch.Tensor:
    out = t.new_empty((cap, *t.shape[1:]))
    out[:n] = t[:n]
    return out


def faiss_available() -> bool:
    """True when the optional faiss package can be imported."""
    try:
        importlib.import_module("faiss")
    except ImportError:
        return False
    return True
