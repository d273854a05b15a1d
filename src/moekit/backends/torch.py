"""The reference-quality vectorised backend, and the CPU path.

Slots arrive sorted by expert, so each expert's rows are one contiguous slice: one matmul
pair per expert slice, then a weighted index_add combine. (A padded [E, C_max, D] batched
matmul was measured slower than this loop on a 2-core CPU even with 64 small experts.)
Shape legend: T tokens, S sorted token-slots (N kept), E experts, D model dim,
H1 expert hidden (2H when gated), H activation width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def _mlp(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Tensor | None,
    b2: Tensor | None,
    act: str,
    scale: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """x [..., n, D] -> [..., n, D] with per-batch weights w1 [..., D, H1], w2 [..., H, D].

    `scale` [..., n, 1] (the gate weights) multiplies the activation before w2 when given:
    the same product as scaling the output, on H columns instead of D. `out` receives the
    result in place (inference only).
    """
    h = x @ w1
    if b1 is not None:
        h = h + b1.unsqueeze(-2)
    a = activate(h, act)
    a = a * scale.to(a.dtype) if scale is not None else a
    if out is not None:  # no autograd: write in place
        torch.matmul(a, w2, out=out)
        return out.add_(b2.unsqueeze(-2)) if b2 is not None else out
    y = a @ w2
    return y + b2.unsqueeze(-2) if b2 is not None else y


def _per_expert(x_ND: Tensor, sizes: list[int], w1, w2, b1, b2, act: str, scale_N1) -> Tensor:
    # split/unbind rather than slicing: their backward is one cat/stack, where each slice's
    # backward would allocate a full-size zero gradient per expert
    w1_e, w2_e = w1.unbind(0), w2.unbind(0)
    b1_e = b1.unbind(0) if b1 is not None else [None] * len(sizes)
    b2_e = b2.unbind(0) if b2 is not None else [None] * len(sizes)
    scale_e = scale_N1.split(sizes) if scale_N1 is not None else [None] * len(sizes)
    if not torch.is_grad_enabled():  # inference: write each slice in place, no final cat
        out_ND = x_ND.new_empty(x_ND.shape[0], w2.shape[-1])
        for e, (x_nD, out_nD) in enumerate(
            zip(x_ND.split(sizes), out_ND.split(sizes), strict=True)
        ):
            if x_nD.shape[0]:
                _mlp(x_nD, w1_e[e], w2_e[e], b1_e[e], b2_e[e], act, scale_e[e], out=out_nD)
        return out_ND
    pieces = [
        _mlp(x_nD, w1_e[e], w2_e[e], b1_e[e], b2_e[e], act, scale_e[e])
        for e, x_nD in enumerate(x_ND.split(sizes))
        if x_nD.shape[0]
    ]
    return torch.cat(pieces)


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
    # gather rows grouped by expert; embedding is the same row gather as index_select and
    # an order of magnitude faster on CPU
    x_ND = F.embedding(token_N, x_TD)
    weight_N1 = plan.weight_S[:n_kept].unsqueeze(-1)
    # scale by the gate weight on the narrower side of w2 (bias b2 must be scaled too)
    scale_early = b2 is None and w2.shape[-2] <= w2.shape[-1]
    scale_N1 = weight_N1 if scale_early else None
    sizes = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    out_ND = _per_expert(x_ND, sizes, w1, w2, b1, b2, activation, scale_N1)
    if not scale_early:
        out_ND = out_ND * weight_N1
    return y_TD.index_add(0, token_N, out_ND.to(out_dtype)).to(x_TD.dtype)
