"""Deduplication plan for a batch of insights, computed before anything is written."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from moekit.memory._index import VectorCache

# One validated row: (experts, layer, step, metadata).
Item = tuple[tuple[int, ...], int | None, int | None, dict[str, Any]]


@dataclass
class Pending:
    """A node that the batch creates or merges into, with what the batch adds to it."""

    src: int = -1  # batch row holding the embedding (new nodes only)
    layer: int | None = None
    step: int | None = None
    experts: set[int] = field(default_factory=set)
    metadata: dict[str, Any] = field(default_factory=dict)
    count: int = 0
    tick: int = 0

    def absorb(self, experts: Iterable[int], metadata: dict[str, Any], tick: int) -> None:
        self.experts.update(experts)
        self.metadata.update(metadata)
        self.count += 1
        self.tick = tick


def plan_batch(
    cache: VectorCache,
    unit_ND: torch.Tensor,
    layers_N: torch.Tensor,
    items: list[Item],
    dedup: bool,
    threshold: float,
    tick0: int,
) -> tuple[list[Pending], dict[int, Pending], list[tuple[bool, int]]]:
    """Decide, row by row, whether each row becomes a new node or merges into an existing one.

    Rows are handled in order, so a row can merge into a node created by an earlier row of the
    same batch: the outcome equals that of adding the rows one at a time. The stored nodes are
    searched once for the whole batch (merging never moves a node's embedding).

    unit_ND: [N, D] unit embeddings; layers_N: [N], NO_LAYER for rows without a layer.
    Returns (new nodes in creation order, merges into stored nodes keyed by id, and per row
    (True, index into new) or (False, stored node id)).
    """
    n = unit_ND.shape[0]
    new: list[Pending] = []
    merged: dict[int, Pending] = {}
    targets: list[tuple[bool, int]] = []
    if dedup:
        old_sims_NK, old_ids_NK = cache.search(unit_ND, 1, layers_N)  # [N, K], K <= 1
        new_unit_MD = torch.empty_like(unit_ND)  # [M, D], rows of this batch's new nodes
        new_layers_M = torch.empty(n, dtype=torch.int64)  # [M]
    for i, (experts, layer, step, metadata) in enumerate(items):
        target: tuple[bool, int] | None = None
        if dedup:
            best = -float("inf")
            if old_ids_NK.shape[1] and old_ids_NK[i, 0] >= 0 and old_sims_NK[i, 0] >= threshold:
                best, target = float(old_sims_NK[i, 0]), (False, int(old_ids_NK[i, 0]))
            m = len(new)
            if m:
                sims_M = new_unit_MD[:m] @ unit_ND[i]  # [M]
                if layer is not None:
                    sims_M.masked_fill_(new_layers_M[:m] != layer, -float("inf"))
                j = int(sims_M.argmax())
                if float(sims_M[j]) >= threshold and float(sims_M[j]) > best:
                    target = (True, j)
        if target is None:
            target = (True, len(new))
            if dedup:
                new_unit_MD[len(new)] = unit_ND[i]
                new_layers_M[len(new)] = layers_N[i]
            new.append(Pending(src=i, layer=layer, step=step))
        pending = new[target[1]] if target[0] else merged.setdefault(target[1], Pending())
        pending.absorb(experts, metadata, tick0 + i + 1)
        targets.append(target)
    return new, merged, targets
