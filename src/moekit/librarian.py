"""Librarian deduplication: merge a token's experts whose outputs are near-duplicates.

At inference (`MoEConfig.dedup_threshold`), each token's kept expert outputs are compared by
cosine similarity. Walking the token's slots from the highest gate weight down, a slot whose
output has cosine >= threshold with an earlier *surviving* slot gives its weight to the first
such slot and drops out; otherwise it survives. The token's output is then
sum over survivors of merged weight * expert output, so a near-duplicate's contribution is
replaced by the higher-weight expert's. Exact duplicates therefore leave y unchanged up to
rounding; the merge matters when outputs agree in direction but not exactly.

It needs every slot's own output, so the layer asks its dispatcher for stage 3 without the
combine (the backend's per-slot outputs, the same FLOPs as the normal pass) and `deduplicate`
combines them with the merged weights through `dispatch.combine`. Training ignores the
option: the merge is a hard, non-differentiable decision on expert outputs.
Shape legend: T tokens, K slots per token, S = T * K token-slots, N <= S leading sorted slots,
D model dim.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.dispatch import combine
from moekit.types import Plan


def slot_outputs(out_ND: Tensor, plan: Plan) -> Tensor:
    """Per-slot outputs in the router's slot order [T, K, D] (zeros where not kept).

    out_ND: unweighted outputs of the plan's first N sorted slots, zero past the kept ones.
    """
    T, K = plan.kept_TK.shape
    flat_SD = out_ND.new_zeros(T * K, out_ND.shape[-1])
    flat_SD.index_copy_(0, plan.order_S[: out_ND.shape[0]], out_ND)
    return flat_SD.view(T, K, out_ND.shape[-1])


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


def deduplicate(
    out_ND: Tensor, plan: Plan, threshold: float, n_tokens: int
) -> tuple[Tensor, Plan, Tensor]:
    """Combine with librarian merging: (y [T, D], plan with the merged weights, fired fraction).

    out_ND: unweighted outputs of the plan's first N sorted slots (a dispatcher's `slots`).
    The fraction is absorbed slots over kept slots (0 when nothing is kept).
    """
    merged_TK, absorbed_TK = merge_duplicates(
        slot_outputs(out_ND, plan), plan.weights_TK, plan.kept_TK, threshold
    )
    merged_S = merged_TK.reshape(-1)[plan.order_S]
    y_TD = combine(out_ND, plan.token_S, merged_S, n_tokens)
    n_kept = plan.kept_TK.sum().clamp_min(1)
    fraction = absorbed_TK.sum() / n_kept
    return y_TD, replace(plan, weights_TK=merged_TK, weight_S=merged_S), fraction.float()
