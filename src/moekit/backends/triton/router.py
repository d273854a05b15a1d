"""The top-k and sigmoid routers' math after the logits GEMM as one kernel (inference).

Eager serving pays a launch per torch op of `select` (softmax or sigmoid, bias, top-k, gather,
renormalise, scale, probs): a dozen launches for a few microseconds of work. One program
holds BLOCK_T tokens' [E] scores, picks the k best by k rounds of argmax (descending, ties to
the lower expert id, as `torch.topk`), and writes experts, weights, priority and probs.
It keeps no autograd graph, so routers call it only when no gradient is needed.

Shape legend: T tokens, E experts (padded to BLOCK_E), K slots per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moekit.backends.triton.ops import triton_op
from moekit.types import Routing


@triton.jit
def _select_kernel(
    logits_ptr,  # [T, E] float32
    bias_ptr,  # [E] float32 selection bias (sigmoid router), unused for softmax
    experts_ptr,  # [T, K] int64 out
    weights_ptr,  # [T, K] float32 out: renormalised (optional) and scaled
    priority_ptr,  # [T, K] float32 out: the score the slot was selected by
    probs_ptr,  # [T, E] float32 out: scores normalised over the experts
    T,
    E,
    stride_l,
    scaling,
    K: tl.constexpr,
    SIGMOID: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    mask_t, mask_e = t < T, e < E
    mask = mask_t[:, None] & mask_e[None, :]
    logits = tl.load(logits_ptr + t[:, None] * stride_l + e[None, :], mask=mask, other=0.0)
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-logits))
        bias = tl.load(bias_ptr + e, mask=mask_e, other=0.0)
        chosen_by = scores + bias[None, :]
        total = tl.sum(tl.where(mask_e[None, :], scores, 0.0), 1)
        probs = scores / tl.maximum(total, 1e-20)[:, None]
    else:
        row_max = tl.max(tl.where(mask_e[None, :], logits, float("-inf")), 1)  # padded t: 0
        shifted = tl.exp(logits - row_max[:, None])
        shifted = tl.where(mask_e[None, :], shifted, 0.0)
        scores = shifted / tl.sum(shifted, 1)[:, None]
        chosen_by = scores
        probs = scores
    tl.store(probs_ptr + t[:, None] * E + e[None, :], probs, mask=mask)
    left = tl.where(mask_e[None, :], chosen_by, float("-inf"))
    j = tl.arange(0, BLOCK_K)
    picked = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    weight = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    priority = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for i in tl.static_range(K):
        best = tl.argmax(left, 1)  # [BLOCK_T] first index of the maximum
        hit = e[None, :] == best[:, None]
        slot = j[None, :] == i
        picked = tl.where(slot, best[:, None], picked)
        weight = tl.where(slot, tl.sum(tl.where(hit, scores, 0.0), 1)[:, None], weight)
        priority = tl.where(slot, tl.sum(tl.where(hit, chosen_by, 0.0), 1)[:, None], priority)
        left = tl.where(hit, float("-inf"), left)
    if RENORMALIZE:
        weight = weight / tl.maximum(tl.sum(weight, 1), 1.1754943508222875e-38)[:, None]
    out = t[:, None] * K + j[None, :]
    mask_k = mask_t[:, None] & (j[None, :] < K)
    tl.store(experts_ptr + out, picked.to(tl.int64), mask=mask_k)
    tl.store(weights_ptr + out, weight * scaling, mask=mask_k)
    tl.store(priority_ptr + out, priority, mask=mask_k)


@triton_op("moekit_triton::route_select")
def route_select(
    logits_TE: Tensor, bias_E: Tensor | None, k: int, renormalize: bool, scaling: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(experts_TK, weights_TK, priority_TK, probs_TE); softmax scores when bias_E is None,
    else sigmoid scores selected by score + bias_E."""
    T, E = logits_TE.shape
    device = logits_TE.device
    experts_TK = torch.empty(T, k, dtype=torch.long, device=device)
    weights_TK = torch.empty(T, k, dtype=torch.float32, device=device)
    priority_TK = torch.empty_like(weights_TK)
    probs_TE = torch.empty(T, E, dtype=torch.float32, device=device)
    if T == 0 or k == 0:
        return experts_TK, weights_TK, priority_TK, probs_TE
    logits_TE = logits_TE if logits_TE.stride(1) == 1 else logits_TE.contiguous()
    block_e = triton.next_power_of_2(max(E, 2))
    block_t = max(1, min(16, 4096 // block_e))
    _select_kernel[(triton.cdiv(T, block_t),)](
        logits_TE,
        logits_TE if bias_E is None else bias_E,
        experts_TK,
        weights_TK,
        priority_TK,
        probs_TE,
        T,
        E,
        logits_TE.stride(0),
        scaling,
        K=k,
        SIGMOID=bias_E is not None,
        RENORMALIZE=renormalize,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(max(k, 2)),
    )
    return experts_TK, weights_TK, priority_TK, probs_TE


@route_select.register_fake
def _(
    logits_TE: Tensor, bias_E: Tensor | None, k: int, renormalize: bool, scaling: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    T = logits_TE.shape[0]
    weights_TK = logits_TE.new_empty(T, k, dtype=torch.float32)
    experts_TK = logits_TE.new_empty(T, k, dtype=torch.long)
    return experts_TK, weights_TK, torch.empty_like(weights_TK), torch.empty_like(logits_TE)


def fused_select(
    logits_TE: Tensor, k: int, renormalize: bool, scaling: float, bias_E: Tensor | None = None
) -> Routing:
    """The Routing `TopKRouter.select` (bias_E None) or `SigmoidRouter.select` would return."""
    experts_TK, weights_TK, priority_TK, probs_TE = route_select(
        logits_TE, bias_E, k, renormalize, float(scaling)
    )
    return Routing(
        experts=experts_TK,
        weights=weights_TK,
        priority=priority_TK,
        logits=logits_TE,
        probs=probs_TE,
    )
