"""The reference-quality vectorised backend, and the CPU path.

Slots arrive sorted by expert, so each expert's rows are one contiguous slice: one matmul
pair per expert slice, then `dispatch.combine`. (A padded [E, C_max, D] batched
matmul was measured slower than this loop on a 2-core CPU even with 64 small experts.)
Shape legend: T tokens, S sorted token-slots (N kept), E experts, D model dim,
H1 expert hidden (2H when gated), H activation width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.backends.base import Backend, register_backend
from moekit.dispatch import combine, gather
from moekit.types import ExpertWeights, Plan, activate


def _sync_expert_bounds(offsets_E1: Tensor) -> list[int]:
    """Per-expert slice bounds on the host.

    NOTE: host sync. Python slicing needs the counts; the grouped_mm and triton backends
    keep them on the device instead.
    """
    return offsets_E1.tolist()


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


def _per_expert(
    x_ND: Tensor, sizes: list[int], w: ExpertWeights, act: str, scale_N1: Tensor | None
) -> Tensor:
    # split/unbind rather than slicing: their backward is one cat/stack, where each slice's
    # backward would allocate a full-size zero gradient per expert
    w1, w2 = w.w1, w.w2
    w1_e, w2_e = w1.unbind(0), w2.unbind(0)
    b1_e = w.b1.unbind(0) if w.b1 is not None else [None] * len(sizes)
    b2_e = w.b2.unbind(0) if w.b2 is not None else [None] * len(sizes)
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


def _grouped(
    x_ND: Tensor, bounds: list[int], w: ExpertWeights, act: str, scale_N1: Tensor | None
) -> Tensor:
    """[N, D] outputs of the N = bounds[-1] kept sorted rows, one matmul pair per expert."""
    if bounds[-1] == 0:
        return x_ND.new_zeros(0, w.w2.shape[-1])
    sizes = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    return _per_expert(x_ND, sizes, w, act, scale_N1)


@register_backend("torch", priority=0)
class TorchBackend(Backend):
    """Any float dtype on any device: the fallback "auto" ends at."""

    def unsupported(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return None if dtype.is_floating_point else f"dtype {dtype} is not floating point"

    def per_slot(
        self, x_SD: Tensor, offsets_E1: Tensor, w: ExpertWeights, activation: str
    ) -> Tensor:
        bounds = _sync_expert_bounds(offsets_E1)
        x_ND = x_SD if x_SD.shape[0] == bounds[-1] else x_SD[: bounds[-1]]  # no needless slice
        return _grouped(x_ND, bounds, w, activation, None)

    def forward(self, x_TD: Tensor, plan: Plan, w: ExpertWeights, activation: str) -> Tensor:
        bounds = _sync_expert_bounds(plan.offsets_E1)
        n_kept, T = bounds[-1], x_TD.shape[0]
        out_dtype = torch.promote_types(x_TD.dtype, plan.weight_S.dtype)
        if n_kept == 0:
            return torch.zeros(x_TD.shape, dtype=out_dtype, device=x_TD.device).to(x_TD.dtype)
        token_N = plan.token_S[:n_kept]
        x_ND = gather(x_TD, token_N)
        # scale by the gate weight on the narrower side of w2 (bias b2 must be scaled too)
        if w.b2 is None and w.w2.shape[-2] <= w.w2.shape[-1]:
            scale_N1 = plan.weight_S[:n_kept].unsqueeze(-1)
            out_ND = _grouped(x_ND, bounds, w, activation, scale_N1)
            return combine(out_ND.to(out_dtype), token_N, None, T).to(x_TD.dtype)
        out_ND = _grouped(x_ND, bounds, w, activation, None)
        return combine(out_ND, token_N, plan.weight_S, T)
