"""Record routing decisions of an MoE layer into a KnowledgeStore.

Works on plain tensors: hidden states [B, S, D] or [T, D] and the router's expert ids [T, k]
(int64, -1 marks an unused slot), so it can sit in a forward hook of any MoE layer.
"""

from __future__ import annotations

from typing import Any

import torch

from moekit.memory import _validate as v
from moekit.memory.store import KnowledgeStore

_MODES = ("top", "union")


def pool_routing(
    hidden: torch.Tensor, experts: torch.Tensor, mode: str = "top", top_n: int | None = None
) -> tuple[torch.Tensor, list[list[int]]]:
    """Pool each sequence into one insight: (mean hidden state [B, D], expert ids per sequence).

    hidden: [B, S, D] (B sequences) or [T, D] (one sequence); experts: [B*S, k] or [T, k].
    mode "top" keeps the ``top_n`` (default k) most frequently routed experts, ties to the lower
    id; "union" keeps every expert used. Slots holding -1 are ignored.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if not isinstance(hidden, torch.Tensor) or hidden.ndim not in (2, 3):
        raise ValueError("hidden must be a tensor of shape [B, S, D] or [T, D]")
    hidden_BSD = hidden.detach().float().cpu()
    if hidden_BSD.ndim == 2:
        hidden_BSD = hidden_BSD.unsqueeze(0)  # [1, T, D]
    b, s, _ = hidden_BSD.shape
    if not isinstance(experts, torch.Tensor) or experts.ndim != 2 or experts.shape[0] != b * s:
        raise ValueError(f"experts must be a tensor of shape [{b * s}, k] matching hidden")
    if experts.is_floating_point():
        raise ValueError("experts must hold integer expert ids")
    k = experts.shape[1]
    top_n = v.check_int("top_n", k if top_n is None else top_n, minimum=1)
    experts_BX = experts.detach().cpu().long().reshape(b, s * k)  # [B, S*k]
    pooled = []
    for row in experts_BX:
        used = row[row >= 0]
        if used.numel() == 0:
            pooled.append([])
            continue
        ids, counts = used.unique(return_counts=True)  # ids ascending
        if mode == "top":
            order = sorted(range(len(ids)), key=lambda j: (-int(counts[j]), int(ids[j])))
            ids = ids[order[:top_n]]
        pooled.append(sorted(ids.tolist()))
    return hidden_BSD.mean(dim=1), pooled  # [B, D]


class KnowledgeRecorder:
    """Stores pooled routing insights every ``every`` calls (the 1st, every+1-th, ...).

    >>> rec = KnowledgeRecorder(store, every=10)
    >>> rec(hidden, info.routing.experts, layer=3, step=global_step)  # inside a training loop
    """

    def __init__(
        self, store: KnowledgeStore, every: int = 1, mode: str = "top", top_n: int | None = None
    ) -> None:
        self.store = store
        self.every = v.check_int("every", every, minimum=1)
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.mode = mode
        self.top_n = v.check_int("top_n", top_n, minimum=1, allow_none=True)
        self.calls = 0

    def __call__(
        self,
        hidden: torch.Tensor,
        experts: torch.Tensor,
        layer: int | None = None,
        step: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> list[int]:
        """Record one insight per sequence on sampled calls; returns the node ids (or [])."""
        due = self.calls % self.every == 0
        self.calls += 1
        if not due:
            return []
        emb_BD, expert_sets = pool_routing(hidden, experts, self.mode, self.top_n)
        return self.store.add_many(emb_BD, expert_sets, layer, step, metadata)
