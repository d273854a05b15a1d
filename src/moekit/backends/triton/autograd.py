"""The autograd Functions of the Triton backend: the fused stage 3 and its per-slot middle.

`FusedExperts`: y [T, D] = combine(weight * expert(x[token])), gather and combine fused.
`PerSlotExperts`: out [S, D] = expert(x_SD) on rows already sorted by expert, unweighted and
uncombined, zero past the kept rows (the `Backend.per_slot` contract of `moekit.backends`).
Both run the same ops (align.schedule, up, down, backward*); in the decode and interpreter
shape classes the forward GEMM programs find their own tile (one launch fewer).

Shape legend: T tokens, K slots per token, S sorted slots, E experts, D model dim, H1 = w1's
last dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.backends.triton.align import schedule
from moekit.backends.triton.backward import backward, backward_per_slot
from moekit.backends.triton.configs import config_by_key, config_key
from moekit.backends.triton.down import combine, down
from moekit.backends.triton.up import up


def _forward_tiles(
    device: torch.device, offsets_E1: Tensor, n_rows: int
) -> tuple[str, int, Tensor | None, Tensor | None]:
    """(config key, block_m, expert_M, row_M); no schedule where programs find their tile."""
    key = config_key(device, n_rows, offsets_E1.shape[0] - 1)
    block_m = config_by_key(device, key)["block_m"]
    if key in ("decode", "interpreter"):  # the latency path: one launch fewer
        return key, block_m, None, None
    return key, block_m, *schedule(offsets_E1, n_rows, block_m)


class FusedExperts(torch.autograd.Function):
    """y [T, D] = combine(weight * expert(x[token])) with Triton kernels forward and backward."""

    @staticmethod
    def forward(
        ctx,
        x_TD: Tensor,
        weight_S: Tensor,
        w1: Tensor,
        w2: Tensor,
        b1: Tensor | None,
        b2: Tensor | None,
        token_S: Tensor,
        order_S: Tensor,
        kept_TK: Tensor,
        offsets_E1: Tensor,
        activation: str,
        train: bool,
    ) -> Tensor:
        T, S = x_TD.shape[0], token_S.shape[0]
        key, block_m, expert_M, row_M = _forward_tiles(x_TD.device, offsets_E1, S)
        h1, a, inv_S = up(
            x_TD, token_S, order_S, w1, b1, expert_M, row_M, offsets_E1, activation, block_m, key,
            train,  # keep h1 for the backward pass
        )  # fmt: skip
        out_SD = down(a, w2, b2, expert_M, row_M, offsets_E1, block_m, key, False)
        y = combine(out_SD, inv_S, weight_S, kept_TK, T)
        ctx.activation, ctx.key = activation, key
        ctx.save_for_backward(
            x_TD, h1, token_S, weight_S, inv_S, kept_TK, offsets_E1, w1, w2, b1, b2
        )
        return y

    @staticmethod
    def backward(ctx, dy_TD: Tensor):
        x_TD, h1, token_S, weight_S, inv_S, kept_TK, offsets_E1, w1, w2, b1, b2 = ctx.saved_tensors
        dx, dw1, dw2, db1, db2, dweight = backward(
            dy_TD, x_TD, h1, token_S, weight_S, inv_S, kept_TK, offsets_E1, w1, w2, b1, b2,
            ctx.activation, ctx.key,
        )  # fmt: skip
        return (
            dx,  # x_TD
            dweight,  # weight_S
            dw1,  # w1
            dw2,  # w2
            db1 if b1 is not None else None,  # b1
            db2 if b2 is not None else None,  # b2
            None,  # token_S (integer)
            None,  # order_S (integer)
            None,  # kept_TK (bool)
            None,  # offsets_E1 (integer)
            None,  # activation
            None,  # train
        )


class PerSlotExperts(torch.autograd.Function):
    """out [S, D] = expert(x_SD) per sorted row, unweighted, zero past the kept rows."""

    @staticmethod
    def forward(
        ctx,
        x_SD: Tensor,
        w1: Tensor,
        w2: Tensor,
        b1: Tensor | None,
        b2: Tensor | None,
        offsets_E1: Tensor,
        activation: str,
        train: bool,
    ) -> Tensor:
        key, block_m, expert_M, row_M = _forward_tiles(x_SD.device, offsets_E1, x_SD.shape[0])
        h1, a, _ = up(
            x_SD, None, None, w1, b1, expert_M, row_M, offsets_E1, activation, block_m, key, train
        )
        out_SD = down(a, w2, b2, expert_M, row_M, offsets_E1, block_m, key, True)
        ctx.activation, ctx.key = activation, key
        ctx.save_for_backward(x_SD, h1, offsets_E1, w1, w2, b1, b2)
        return out_SD

    @staticmethod
    def backward(ctx, dout_SD: Tensor):
        x_SD, h1, offsets_E1, w1, w2, b1, b2 = ctx.saved_tensors
        dx, dw1, dw2, db1, db2 = backward_per_slot(
            dout_SD, x_SD, h1, offsets_E1, w1, w2, b1, b2, ctx.activation, ctx.key
        )
        return (
            dx,  # x_SD
            dw1,  # w1
            dw2,  # w2
            db1 if b1 is not None else None,  # b1
            db2 if b2 is not None else None,  # b2
            None,  # offsets_E1 (integer)
            None,  # activation
            None,  # train
        )
