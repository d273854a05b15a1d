"""`torch._grouped_mm` backend: two grouped GEMMs over the expert-sorted rows, no host sync.

Rows past the last kept slot are computed over garbage and masked out with `where`, so the
sizes stay static (graph-capturable). Shape legend as in `moekit.backends.torch`.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.dispatch import Plan
from moekit.experts import activate


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


def supported(device: torch.device, dtype: torch.dtype) -> str | None:
    return _probe(device.type, device.index, dtype)


def experts_forward(
    x_TD: Tensor,
    plan: Plan,
    w1: Tensor,
    w2: Tensor,
    b1: Tensor | None,
    b2: Tensor | None,
    activation: str,
) -> Tensor:
    E = plan.n_experts
    ends_E = plan.offsets_E1[1:].to(torch.int32)
    kept_S = plan.expert_S < E
    expert_S = plan.expert_S.clamp_max(E - 1)
    # every grouped_mm input is zeroed past the kept rows: the gradients grouped_mm returns
    # for those rows are unspecified and must not flow back into x, b1 or the activation
    keep_S1 = kept_S.unsqueeze(-1)
    x_SD = torch.where(keep_S1, F.embedding(plan.token_S, x_TD), 0.0)
    # outputs past the kept rows are unspecified (NaN possible): zero them before any
    # elementwise op, whose backward would turn 0 * NaN into NaN gradients (b1, gate weights)
    h = torch.where(keep_S1, torch._grouped_mm(x_SD, w1.to(x_TD.dtype), offs=ends_E), 0.0)
    if b1 is not None:
        h = h + b1.to(h.dtype).index_select(0, expert_S)
    a_SH = torch.where(keep_S1, activate(h, activation), 0.0)
    out_SD = torch.where(keep_S1, torch._grouped_mm(a_SH, w2.to(x_TD.dtype), offs=ends_E), 0.0)
    if b2 is not None:
        out_SD = out_SD + b2.to(out_SD.dtype).index_select(0, expert_S)
    # dropped slots carry weight 0, so their (finite) rows add nothing
    contrib_SD = out_SD.to(plan.weight_S.dtype) * plan.weight_S.unsqueeze(-1)
    y_TD = torch.zeros(x_TD.shape, dtype=contrib_SD.dtype, device=x_TD.device)
    return y_TD.index_add(0, plan.token_S, contrib_SD).to(x_TD.dtype)
