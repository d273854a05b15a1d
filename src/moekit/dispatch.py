"""Stage 2 of the layer, and the two halves of stage 3's data movement.

`make_plan` turns routing into a `Plan` of token-slots grouped by expert; `gather` reads the
rows of x in that order and `combine` sums per-slot expert outputs back into token rows, the
one weighted combine every caller shares (backends, expert parallelism, the librarian).
`LocalDispatcher` is stage 3's data movement on one device; expert parallelism has its
all-to-all twin in `moekit.parallel`.

Shape legend: T tokens, K slots per token, S = T * K token-slots, N <= S leading sorted slots,
E experts, C capacity, D model dim. Every tensor keeps its static size S: dropped and empty
slots are sorted to the end and `offsets_E1[E]` says where the kept ones stop, so nothing here
needs a host sync.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.types import Plan


class PlanMaker(Protocol):
    """A backend's faster dropless plan (`moekit.backends.Backend.make_plan`)."""

    def make_plan(
        self, experts_TK: Tensor, weights_TK: Tensor, n_experts: int, capacity: int | None
    ) -> Plan | None: ...


class SlotExperts(Protocol):
    """Stage 3's experts as a dispatcher runs them (`moekit.backends.Bound`)."""

    def forward(self, x_TD: Tensor, plan: Plan) -> Tensor: ...

    def per_slot(self, x_SD: Tensor, offsets_E1: Tensor) -> Tensor: ...


def make_plan(
    experts_TK: Tensor,
    weights_TK: Tensor,
    priority_TK: Tensor,
    n_experts: int,
    capacity: int | None = None,
    renormalize_after_drop: bool = False,
    backend: PlanMaker | None = None,
) -> Plan:
    """Sort token-slots by expert; with a capacity, keep each expert's C highest-priority slots.

    Drops depend on priority (the gate score), never on token position, so permuting the
    tokens permutes the result. `backend`'s own plan is used where it has one (equal output).
    """
    if backend is not None:
        plan = backend.make_plan(experts_TK, weights_TK, n_experts, capacity)
        if plan is not None:
            return plan
    T, K = experts_TK.shape
    S, E = T * K, n_experts
    device = experts_TK.device
    bucket_S = torch.where(experts_TK >= 0, experts_TK, E).reshape(-1)  # empty slots -> E
    if capacity is None:
        order_S = torch.argsort(bucket_S, stable=True)
    else:  # by priority, then stably by expert: each expert's slots are best-first
        by_priority_S = torch.argsort(priority_TK.reshape(-1), descending=True, stable=True)
        order_S = by_priority_S[torch.argsort(bucket_S[by_priority_S], stable=True)]
    sorted_bucket_S = bucket_S[order_S]
    counts_E1 = torch.zeros(E + 1, dtype=torch.long, device=device)
    counts_E1.scatter_add_(0, bucket_S, torch.ones_like(bucket_S))
    starts_E1 = torch.cumsum(counts_E1, 0) - counts_E1
    rank_S = torch.arange(S, device=device) - starts_E1[sorted_bucket_S]
    keep_S = sorted_bucket_S < E
    if capacity is not None:
        keep_S = keep_S & (rank_S < capacity)
    # second stable pass: dropped slots join the empty ones at the end
    key_S = torch.where(keep_S, sorted_bucket_S, E)
    resort_S = torch.argsort(key_S, stable=True)
    order_S, keep_S, key_S = order_S[resort_S], keep_S[resort_S], key_S[resort_S]

    kept_TK = torch.zeros(S, dtype=torch.bool, device=device).scatter(0, order_S, keep_S).view(T, K)
    used_TK = weights_TK * kept_TK
    if renormalize_after_drop and capacity is not None:
        before_T = weights_TK.sum(-1, keepdim=True)
        after_T = used_TK.sum(-1, keepdim=True)
        used_TK = used_TK * (before_T / after_T.clamp_min(torch.finfo(used_TK.dtype).tiny))
    counts_E = counts_E1[:E] if capacity is None else counts_E1[:E].clamp_max(capacity)
    offsets_E1 = torch.cat([counts_E.new_zeros(1), torch.cumsum(counts_E, 0)])
    token_S = order_S // K if K else order_S
    return Plan.from_sort(order_S, token_S, key_S, counts_E, offsets_E1, kept_TK, used_TK, capacity)


def gather(x_TD: Tensor, token_S: Tensor) -> Tensor:
    """x_SD [S, D]: row token_S[s] of x for each sorted slot (the input of grouped experts)."""
    # embedding is the same row gather as index_select and an order of magnitude faster on CPU
    return F.embedding(token_S, x_TD)


def combine(out_ND: Tensor, token_S: Tensor, weight_S: Tensor | None, n_tokens: int) -> Tensor:
    """y_TD [T, D] in out's dtype: y[t] = sum of weight_S[s] * out_ND[s] over t's sorted slots.

    Only the first N = out_ND.shape[0] slots are read: a caller that knows where the kept ones
    stop may pass just those. Accumulates in promote(out, weight) and rounds once; weight_S None
    sums unweighted (outputs already scaled by their gate weight).
    """
    N = out_ND.shape[0]
    acc = out_ND.dtype if weight_S is None else torch.promote_types(out_ND.dtype, weight_S.dtype)
    contrib_ND = out_ND.to(acc)
    if weight_S is not None:
        contrib_ND = contrib_ND * weight_S[:N].unsqueeze(-1)
    y_TD = torch.zeros(n_tokens, out_ND.shape[-1], dtype=acc, device=out_ND.device)
    return y_TD.index_add(0, token_S[:N], contrib_ND).to(out_ND.dtype)


# work a dispatcher runs while rows are in flight (the shared experts), its result returned
Overlap = Callable[[], Tensor] | None
Rows = tuple[Tensor, Tensor | None]  # (stage 3's output, overlap() or None)


def _run(overlap: Overlap) -> Tensor | None:
    return overlap() if overlap is not None else None


class Dispatcher:
    """Stage 3's data movement: rows to the experts and back. Subclasses implement `slots`;
    `combined` is slots then `combine` unless a subclass can fuse them."""

    def slots(self, x_TD: Tensor, plan: Plan, run: SlotExperts, overlap: Overlap = None) -> Rows:
        """(unweighted outputs [N, D] of the plan's N leading sorted slots, overlap() or None)."""
        raise NotImplementedError

    def combined(self, x_TD: Tensor, plan: Plan, run: SlotExperts, overlap: Overlap = None) -> Rows:
        """(y_TD [T, D] weighted and combined, overlap() or None)."""
        out_ND, overlap_TD = self.slots(x_TD, plan, run, overlap)
        return combine(out_ND, plan.token_S, plan.weight_S, x_TD.shape[0]), overlap_TD

    def extra_repr(self) -> str:
        """What the layer's repr adds for this dispatcher."""
        return ""


class LocalDispatcher(Dispatcher):
    """Stage 3 on this device: rows never leave it, so the backend fuses gather, experts and
    combine into one call."""

    def slots(self, x_TD: Tensor, plan: Plan, run: SlotExperts, overlap: Overlap = None) -> Rows:
        return run.per_slot(gather(x_TD, plan.token_S), plan.offsets_E1), _run(overlap)

    def combined(self, x_TD: Tensor, plan: Plan, run: SlotExperts, overlap: Overlap = None) -> Rows:
        return run.forward(x_TD, plan), _run(overlap)
