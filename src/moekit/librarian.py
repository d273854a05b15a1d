"""Librarian deduplication: merge a token's experts whose outputs are near-duplicates.

At inference (`MoEConfig.dedup_threshold`), each token's kept expert outputs are compared by
cosine similarity. Walking the token's slots from the highest gate weight down, a slot whose
output has cosine >= threshold with an earlier *surviving* slot gives its weight to the first
such slot and drops out; otherwise it survives. The token's output is then
sum over survivors of merged weight * expert output, so a near-duplicate's contribution is
replaced by the higher-weight expert's. Exact duplicates therefore leave y unchanged up to
rounding; the merge matters when outputs agree in direction but not exactly.

It needs every slot's own output, so it runs the experts once per token-slot through the same
backend as the layer (the same FLOPs as the normal pass) and combines them itself. Training
ignores the option: the merge is a hard, non-differentiable decision on expert outputs.
Shape legend: T tokens, K slots per token, S = T * K token-slots, D model dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.dispatch import Plan, make_plan


def slot_outputs(
    x_TD: Tensor, experts_TK: Tensor, kept_TK: Tensor, plan: Plan, compute: Callable
) -> Tensor:
    """Unweighted output of each kept slot's expert [T, K, D] (zeros where not kept).

    Every slot becomes its own one-slot row (x repeated K times) so that the backend's combine,
    with weight 1, returns per-slot outputs instead of their weighted sum.
    """
    T, K = experts_TK.shape
    slot_S1 = torch.where(kept_TK, experts_TK, -1).reshape(T * K, 1)
    ones_S1 = plan.weights_TK.new_ones(T * K, 1)
    slot_plan = make_plan(slot_S1, ones_S1, ones_S1, plan.n_experts)
    out_SD = compute(x_TD.repeat_interleave(K, dim=0), slot_plan)
    return out_SD.view(T, K, x_TD.shape[-1])


def merge_duplicates(
    outputs_TKD: Tensor, weights_TK: Tensor, kept_TK: Tensor, threshold: float
) -> tuple[Tensor, Tensor]:
    """(merged weights [T, K], absorbed [T, K] bool) by the rule in the module docstring.

    Slots are visited by descending weight (ties: lower slot first); absorbed slots end with
    weight 0, their survivor holds the sum. Not-kept slots neither absorb nor are absorbed.
    """
    T, K = weights_TK.shape
    order_TK = weights_TK.argsort(dim=-1, descending=True, stable=True)
    w_TK = weights_TK.gather(1, order_TK)
    valid_TK = kept_TK.gather(1, order_TK)
    sorted_TKD = outputs_TKD.gather(1, order_TK.unsqueeze(-1).expand_as(outputs_TKD))
    unit_TKD = F.normalize(
        sorted_TKD.to(torch.promote_types(sorted_TKD.dtype, torch.float32)), dim=-1
    )
    cos_TKK = unit_TKD @ unit_TKD.transpose(1, 2)
    survivor_TK = torch.zeros_like(valid_TK)
    target_TK = torch.arange(K, device=w_TK.device).expand(T, K).clone()  # where weight goes
    for j in range(K):  # K is small and static: no host sync
        if j == 0:
            survivor_TK[:, 0] = valid_TK[:, 0]
            continue
        close_TJ = survivor_TK[:, :j] & (cos_TKK[:, j, :j] >= threshold)
        absorbed_T = close_TJ.any(-1) & valid_TK[:, j]
        first_T = close_TJ.to(torch.uint8).argmax(-1)  # first survivor that is close
        target_TK[:, j] = torch.where(absorbed_T, first_T, j)
        survivor_TK[:, j] = valid_TK[:, j] & ~absorbed_T
    merged_TK = torch.zeros_like(w_TK).scatter_add(1, target_TK, w_TK * valid_TK)
    absorbed_TK = valid_TK & ~survivor_TK
    # back to the router's slot order
    merged_TK = torch.zeros_like(merged_TK).scatter(1, order_TK, merged_TK)
    absorbed_TK = torch.zeros_like(absorbed_TK).scatter(1, order_TK, absorbed_TK)
    return merged_TK, absorbed_TK


def deduplicated_compute(
    x_TD: Tensor, experts_TK: Tensor, plan: Plan, compute: Callable, threshold: float
) -> tuple[Tensor, Plan, Tensor]:
    """Stage 3 with librarian merging: (y [T, D], plan with merged weights_TK, fired fraction).

    The fraction is absorbed slots over kept slots (0 when nothing is kept).
    """
    outputs_TKD = slot_outputs(x_TD, experts_TK, plan.kept_TK, plan, compute)
    merged_TK, absorbed_TK = merge_duplicates(outputs_TKD, plan.weights_TK, plan.kept_TK, threshold)
    acc = torch.promote_types(x_TD.dtype, merged_TK.dtype)
    y_TD = torch.einsum("tk,tkd->td", merged_TK.to(acc), outputs_TKD.to(acc)).to(x_TD.dtype)
    n_kept = plan.kept_TK.sum().clamp_min(1)
    fraction = absorbed_TK.sum() / n_kept
    return y_TD, replace(plan, weights_TK=merged_TK), fraction.float()
