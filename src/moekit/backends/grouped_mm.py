"""`torch._grouped_mm` backend: two grouped GEMMs over the expert-sorted rows, no host sync.

Rows past the last kept slot are computed over garbage and masked out with `where`, so the
sizes stay static (graph-capturable); `forward` is `dispatch.combine` of the per-slot
outputs. Shape legend as in `moekit.backends.torch`.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from moekit.backends.base import Backend, register_backend
from moekit.dispatch import combine, gather
from moekit.types import ExpertWeights, Plan, activate


@cache
def _probe(device_type: str, device_index: int | None, dtype: torch.dtype) -> str | None:
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    device = (
        torch.device(device_type, device_index)
        if device_index is not None
        else torch.device(device_type)
    )
    try:
        a = torch.randn(16, 16, device=device, dtype=dtype)
        b = torch.randn(2, 16, 16, device=device, dtype=dtype)
        torch._grouped_mm(a, b, offs=torch.tensor([8, 16], device=device, dtype=torch.int32))
    except (RuntimeError, NotImplementedError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"torch._grouped_mm does not support {dtype} on {device_type} here ({first})"
    return None


def _grouped(
    x_SD: Tensor,
    offsets_E1: Tensor,
    w: ExpertWeights,
    activation: str,
    expert_S: Tensor | None = None,
) -> Tensor:
    """[S, D] expert outputs of the sorted rows; rows past the kept ones hold b2 (or 0).

    expert_S [S]: each row's expert (E past the kept ones), found from offsets when not given.
    """
    S, E = x_SD.shape[0], offsets_E1.shape[0] - 1
    ends_E = offsets_E1[1:].to(torch.int32)
    rows_S = torch.arange(S, device=x_SD.device)
    keep_S1 = (rows_S < offsets_E1[E]).unsqueeze(-1)
    if expert_S is None:
        expert_S = torch.searchsorted(offsets_E1[1:], rows_S, right=True)
    expert_S = expert_S.clamp_max(E - 1)
    # every grouped_mm input is zeroed past the kept rows: the gradients grouped_mm returns
    # for those rows are unspecified and must not flow back into x, b1 or the activation
    x_SD = torch.where(keep_S1, x_SD, 0.0)
    # outputs past the kept rows are unspecified (NaN possible): zero them before any
    # elementwise op, whose backward would turn 0 * NaN into NaN gradients (b1, gate weights)
    h = torch.where(keep_S1, torch._grouped_mm(x_SD, w.w1.to(x_SD.dtype), offs=ends_E), 0.0)
    if w.b1 is not None:
        h = h + w.b1.to(h.dtype).index_select(0, expert_S)
    a_SH = torch.where(keep_S1, activate(h, activation), 0.0)
    out_SD = torch.where(keep_S1, torch._grouped_mm(a_SH, w.w2.to(x_SD.dtype), offs=ends_E), 0.0)
    if w.b2 is not None:
        out_SD = out_SD + w.b2.to(out_SD.dtype).index_select(0, expert_S)
    return out_SD


@register_backend("grouped_mm", priority=10)
class GroupedMMBackend(Backend):
    """Two grouped GEMMs, no host sync; "auto" picks it on CUDA where triton is missing."""

    auto_devices = ("cuda",)

    def unsupported(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return _probe(device.type, device.index, dtype)

    def per_slot(
        self, x_SD: Tensor, offsets_E1: Tensor, w: ExpertWeights, activation: str
    ) -> Tensor:
        """Unweighted outputs [S, D] of the sorted rows, zero past the kept ones."""
        out_SD = _grouped(x_SD, offsets_E1, w, activation)
        if w.b2 is None:
            return out_SD
        rows_S = torch.arange(x_SD.shape[0], device=x_SD.device)
        return torch.where((rows_S < offsets_E1[-1]).unsqueeze(-1), out_SD, 0.0)

    def forward(self, x_TD: Tensor, plan: Plan, w: ExpertWeights, activation: str) -> Tensor:
        # dropped slots carry weight 0, so their (finite) b2 rows add nothing
        x_SD = gather(x_TD, plan.token_S)
        out_SD = _grouped(x_SD, plan.offsets_E1, w, activation, plan.expert_S)
        return combine(out_SD, plan.token_S, plan.weight_S, x_TD.shape[0])
