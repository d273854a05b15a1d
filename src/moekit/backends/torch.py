"""The reference-quality vectorised backend, and the CPU path.

Slots arrive sorted by expert, so each expert's rows are one contiguous slice. Two ways to
run the experts over those slices, chosen per call from the counts:
- per expert: one matmul pair per expert slice (few, large experts);
- padded: slices scattered into an [E, C_max, D] buffer and two batched matmuls, which
  replaces 2E small GEMMs (and their autograd nodes) by two — the win for many small
  experts, used only while padding wastes at most `_MAX_PADDING` of the rows.
Shape legend: T tokens, S sorted token-slots (N kept), E experts, C_max largest expert
slice, D model dim, H1 expert hidden (2H when gated), H activation width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.dispatch import Plan
from moekit.experts import activate

_MAX_PADDING = 0.35  # padded rows / kept rows above which the per-expert loop is used
_MIN_EXPERTS_TO_PAD = 16  # with few experts each GEMM is large and per-call overhead is small


def supported(device: torch.device, dtype: torch.dtype) -> str | None:
    return None if dtype.is_floating_point else f"dtype {dtype} is not floating point"


def _sync_expert_bounds(plan: Plan) -> list[int]:
    """Per-expert slice bounds on the host.

    NOTE: host sync. Python slicing needs the counts; the grouped_mm and triton backends
    keep them on the device instead.
    """
    return plan.offsets_E1.tolist()


def _mlp(
    x: Tensor, w1: Tensor, w2: Tensor, b1: Tensor | None, b2: Tensor | None, act: str
) -> Tensor:
    """x [..., n, D] -> [..., n, D] with per-batch weights w1 [..., D, H1], w2 [..., H, D]."""
    h = x @ w1
    if b1 is not None:
        h = h + b1.unsqueeze(-2)
    out = activate(h, act) @ w2
    return out + b2.unsqueeze(-2) if b2 is not None else out


def _per_expert(x_ND: Tensor, sizes: list[int], w1, w2, b1, b2, act: str) -> Tensor:
    # split/unbind rather than slicing: their backward is one cat/stack, where each slice's
    # backward would allocate a full-size zero gradient per expert
    w1_e, w2_e = w1.unbind(0), w2.unbind(0)
    b1_e = b1.unbind(0) if b1 is not None else [None] * len(sizes)
    b2_e = b2.unbind(0) if b2 is not None else [None] * len(sizes)
    pieces = [
        _mlp(x_nD, w1_e[e], w2_e[e], b1_e[e], b2_e[e], act)
        for e, x_nD in enumerate(x_ND.split(sizes))
        if x_nD.shape[0]
    ]
    return torch.cat(pieces)


def _padded(x_ND: Tensor, plan: Plan, sizes: list[int], w1, w2, b1, b2, act: str) -> Tensor:
    E, N, C_max = len(sizes), x_ND.shape[0], max(sizes)
    expert_N = plan.expert_S[:N]
    row_N = expert_N * C_max + (torch.arange(N, device=x_ND.device) - plan.offsets_E1[expert_N])
    x_EC_D = x_ND.new_zeros(E * C_max, x_ND.shape[1]).index_copy(0, row_N, x_ND)
    out_ECD = _mlp(x_EC_D.view(E, C_max, -1), w1, w2, b1, b2, act)
    return out_ECD.reshape(E * C_max, -1).index_select(0, row_N)


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
    out_dtype = torch.promote_types(x_TD.dtype, plan.weight_S.dtype)
    y_TD = torch.zeros(x_TD.shape, dtype=out_dtype, device=x_TD.device)
    if n_kept == 0:
        return y_TD.to(x_TD.dtype)
    token_N = plan.token_S[:n_kept]
    x_ND = x_TD.index_select(0, token_N)  # gather rows, grouped by expert
    sizes = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    padding = len(sizes) * max(sizes) / n_kept - 1.0
    if len(sizes) >= _MIN_EXPERTS_TO_PAD and padding <= _MAX_PADDING:
        out_ND = _padded(x_ND, plan, sizes, w1, w2, b1, b2, activation)
    else:
        out_ND = _per_expert(x_ND, sizes, w1, w2, b1, b2, activation)
    out_ND = out_ND * plan.weight_S[:n_kept].unsqueeze(-1)
    return y_TD.index_add(0, token_N, out_ND.to(out_dtype)).to(x_TD.dtype)
