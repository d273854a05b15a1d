"""Stage 2 of the layer, and the two halves of stage 3's data movement.

`make_plan` turns routing into a `Plan` of token-slots grouped by expert; `gather` reads the
rows of x in that order and `combine` sums per-slot expert outputs back into token rows, the
one weighted combine every caller shares (backends, expert parallelism, the librarian).

Shape legend: T tokens, K slots per token, S = T * K token-slots, N <= S leading sorted slots,
E experts, C capacity, D model dim. Every tensor keeps its static size S: dropped and empty
slots are sorted to the end and `offsets_E1[E]` says where the kept ones stop, so nothing here
needs a host sync.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_HAVE_TRITON = importlib.util.find_spec("triton") is not None  # read once: compile-friendly


@dataclass
class Plan:
    order_S: Tensor  # [S] flat slot ids (t * K + j) sorted by expert; kept slots first
    token_S: Tensor  # [S] source token of each sorted slot
    expert_S: Tensor  # [S] expert of each sorted slot, E for dropped / empty slots
    weight_S: Tensor  # [S] gate weight of each sorted slot, 0 where dropped
    counts_E: Tensor  # [E] int64 kept slots per expert
    offsets_E1: Tensor  # [E + 1] int64 exclusive prefix sums; offsets_E1[E] = kept slots
    kept_TK: Tensor  # [T, K] bool, slot kept after capacity
    weights_TK: Tensor  # [T, K] weights actually used (0 where dropped)
    n_experts: int
    capacity: int | None

    @classmethod
    def from_sort(
        cls,
        order_S: Tensor,
        token_S: Tensor,
        expert_S: Tensor,
        counts_E: Tensor,
        offsets_E1: Tensor,
        kept_TK: Tensor,
        used_TK: Tensor,
        capacity: int | None,
    ) -> Plan:
        """A Plan from a sort of the slots: weight_S is read from used_TK [T, K] through
        order_S (torch ops, so gradients reach the router), E from counts_E."""
        return cls(
            order_S=order_S,
            token_S=token_S,
            expert_S=expert_S,
            weight_S=used_TK.reshape(-1)[order_S],
            counts_E=counts_E,
            offsets_E1=offsets_E1,
            kept_TK=kept_TK,
            weights_TK=used_TK,
            n_experts=counts_E.shape[0],
            capacity=capacity,
        )


def make_plan(
    experts_TK: Tensor,
    weights_TK: Tensor,
    priority_TK: Tensor,
    n_experts: int,
    capacity: int | None = None,
    renormalize_after_drop: bool = False,
) -> Plan:
    """Sort token-slots by expert; with a capacity, keep each expert's C highest-priority slots.

    Drops depend on priority (the gate score), never on token position, so permuting the
    tokens permutes the result.
    """
    if capacity is None and _counting_sort_available(experts_TK.device):
        from moekit.backends.triton.plan import make_plan_dropless

        return make_plan_dropless(experts_TK, weights_TK, n_experts)
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


def _counting_sort_available(device: torch.device) -> bool:
    """On CUDA with triton, the dropless plan is one counting sort (equal output, two launches)."""
    return device.type == "cuda" and _HAVE_TRITON


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
