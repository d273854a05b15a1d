"""Fused down-projection and combine: out_S = a_S @ w2[e] (+ b2[e]) per tile, then
y[t] = sum over t's kept slots, in slot order j = 0..K-1, of weight * out.

The combine is a segmented sum through the inverse of the sort (no float atomics), so y is
bitwise reproducible run to run; it accumulates in fp32 and rounds once. The same combine,
unweighted, sums the per-slot dX rows in the backward pass. It is this backend's fused form of
`dispatch.combine`: it needs the [T, K] slot layout that a Plan has, and no atomics.

Shape legend: T tokens, K slots per token, S = T * K sorted slots, E experts, D model dim,
H expert hidden.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moekit.backends.triton.checks import FLOATS, WEIGHTS, check_operand
from moekit.backends.triton.configs import config_by_key
from moekit.backends.triton.ops import triton_op
from moekit.backends.triton.up import Tiles, gemm_down


@triton_op("moekit_triton::down")
def down(
    a_SH: Tensor,
    w2: Tensor,
    b2: Tensor | None,
    expert_M: Tensor | None,
    row_M: Tensor | None,
    offsets_E1: Tensor,
    block_m: int,
    cfg_key: str,
    zero_tail: bool,
) -> Tensor:
    """out [S, D] = a @ w2[e] + b2[e] for the kept sorted rows; rows past them unwritten, or
    zero with zero_tail (per-slot outputs)."""
    tiles = Tiles(offsets_E1, block_m, expert_M, row_M)
    return gemm_down(a_SH, w2, b2, tiles, config_by_key(a_SH.device, cfg_key)["down"], zero_tail)


@down.register_fake
def _(a_SH, w2, b2, expert_M, row_M, offsets_E1, block_m, cfg_key, zero_tail):
    return a_SH.new_empty(a_SH.shape[0], w2.shape[2])


@triton.jit
def _combine_kernel(
    # pointers
    src_ptr,  # [S, D] per-slot rows in sorted order
    inv_ptr,  # [T * K] int32 sorted position of flat slot t * K + j (written where kept)
    weight_ptr,  # [S] gate weight of each sorted slot; None: unweighted sum
    kept_ptr,  # [T * K] bool, slot kept after capacity
    out_ptr,  # [T, D] out
    # dims
    D,
    K,
    # strides
    stride_sm,
    stride_sd,
    stride_ot,
    stride_od,
    # meta-parameters
    BLOCK_D: tl.constexpr,  # columns per program
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = cols < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in range(0, K):  # fixed order: reproducible sums
        kept = tl.load(kept_ptr + t * K + j) != 0
        pos = tl.where(kept, tl.load(inv_ptr + t * K + j), 0).to(tl.int64)  # inv unset if dropped
        mask = cols < tl.where(kept, D, 0)  # dropped slots: no read (their rows are unwritten)
        row = tl.load(src_ptr + pos * stride_sm + cols * stride_sd, mask=mask, other=0.0)
        scale = tl.load(weight_ptr + pos).to(tl.float32) if weight_ptr is not None else 1.0
        acc += tl.where(kept, scale, 0.0) * row.to(tl.float32)
    o_ptrs = out_ptr + t * stride_ot + cols * stride_od
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton_op("moekit_triton::combine")
def combine(
    src_SD: Tensor, inv_S: Tensor, weight_S: Tensor | None, kept_TK: Tensor, n_tokens: int
) -> Tensor:
    """y [T, D] (src's dtype) = per token, the fp32 sum of its kept slots' (weighted) rows."""
    dev = src_SD.device
    check_operand("kept_TK", kept_TK, (n_tokens, None), (torch.bool,), dev, contiguous=True)
    K = kept_TK.shape[1]
    check_operand("src_SD", src_SD, (n_tokens * K, None), FLOATS, dev)
    check_operand("inv_S", inv_S, (n_tokens * K,), (torch.int32,), dev, contiguous=True)
    if weight_S is not None:
        check_operand("weight_S", weight_S, (n_tokens * K,), WEIGHTS, dev, contiguous=True)
    D = src_SD.shape[1]
    out = src_SD.new_empty(n_tokens, D)
    if n_tokens == 0 or D == 0:
        return out
    block_d = min(triton.next_power_of_2(D), 16 if src_SD.device.type == "cpu" else 1024)
    _combine_kernel[(n_tokens, triton.cdiv(D, block_d))](
        src_SD, inv_S, weight_S, kept_TK, out,
        D, K,
        *src_SD.stride(), *out.stride(),
        BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return out


@combine.register_fake
def _(src_SD, inv_S, weight_S, kept_TK, n_tokens):
    return src_SD.new_empty(n_tokens, src_SD.shape[1])
