"""The reference-quality vectorised backend: one matmul pair per expert on a contiguous slice.

This is the CPU path. Shape legend: T tokens, S sorted token-slots (N kept), E experts,
D model dim, H1 expert hidden (2H when gated).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.dispatch import Plan
from moekit.experts import activate


def supported(device: torch.device, dtype: torch.dtype) -> str | None:
    return None if dtype.is_floating_point else f"dtype {dtype} is not floating point"


def _sync_expert_bounds(plan: Plan) -> list[int]:
    """Per-expert slice bounds on the host.

    NOTE: host sync. Python slicing needs the counts; the grouped_mm and triton backends
    keep them on the device instead.
    """
    return plan.offsets_E1.tolist()


def experts_forward(
    x_TD: Tensor,
    plan: Plan,
    w1: Tensor,
    w2: Tensor,
    b1: Tensor | None,
    b2: Tensor | None,
    activation: str,
) -> Tensor:
    bounds = _sync_expert_bounds(plan)
    n_kept = bounds[-1]
    token_N = plan.token_S[:n_kept]
    x_ND = x_TD.index_select(0, token_N)  # gather rows, grouped by expert
    pieces = []
    for e in range(plan.n_experts):
        lo, hi = bounds[e], bounds[e + 1]
        if hi == lo:
            continue
        h = x_ND[lo:hi] @ w1[e]  # [n_e, H1]
        if b1 is not None:
            h = h + b1[e]
        out = activate(h, activation) @ w2[e]  # [n_e, D]
        pieces.append(out + b2[e] if b2 is not None else out)
    y_TD = torch.zeros(
        x_TD.shape, dtype=torch.promote_types(x_TD.dtype, plan.weight_S.dtype), device=x_TD.device
    )
    if pieces:
        out_ND = torch.cat(pieces) * plan.weight_S[:n_kept].unsqueeze(-1)
        y_TD = y_TD.index_add(0, token_N, out_ND.to(y_TD.dtype))
    return y_TD.to(x_TD.dtype)
