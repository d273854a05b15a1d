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
    # split/unbind rather than slicing: their backward is one cat/stack, where each slice's
    # backward would allocate a full-size zero gradient per expert
    sizes = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    x_chunks = x_ND.split(sizes)
    w1_e, w2_e = w1.unbind(0), w2.unbind(0)
    b1_e = b1.unbind(0) if b1 is not None else None
    b2_e = b2.unbind(0) if b2 is not None else None
    pieces = []
    for e, x_nD in enumerate(x_chunks):
        if x_nD.shape[0] == 0:
            continue
        h = x_nD @ w1_e[e]  # [n_e, H1]
        if b1_e is not None:
            h = h + b1_e[e]
        out = activate(h, activation) @ w2_e[e]  # [n_e, D]
        pieces.append(out + b2_e[e] if b2_e is not None else out)
    y_TD = torch.zeros(
        x_TD.shape, dtype=torch.promote_types(x_TD.dtype, plan.weight_S.dtype), device=x_TD.device
    )
    if pieces:
        out_ND = torch.cat(pieces) * plan.weight_S[:n_kept].unsqueeze(-1)
        y_TD = y_TD.index_add(0, token_N, out_ND.to(y_TD.dtype))
    return y_TD.to(x_TD.dtype)
