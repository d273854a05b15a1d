"""Backward kernels of the fused experts, and the two backward ops built from named parts.

Saved from the forward: x, the pre-activation h1 [S, H1] and the plan. The activation
a = act(h1) is recomputed inside the kernels that need it (cheaper than storing [S, H]), and
dh1 overwrites h1 in place once dW2 has read it, so the backward holds one [S, H1] buffer.

  dh kernel:    g = dy[token] @ w2[e]^T; d weight_s = <g, a_s> (+ <dy, b2[e]>);
                dh1 = weight * g * act'(h1) (gated: gate and up halves)
  wgrad kernel: dW2[e] = (weight * a)^T dy[token] (a materialised once for the kept rows,
                freed before dW1 exists), dW1[e] = x[token]^T dh1, db = column sums
  dX:           per-slot dh1 @ w1[e]^T (`up.gemm_dx`), then the combine of down.py

`backward` is the gradient of the fused y [T, D]; `backward_per_slot` that of the per-slot
outputs [S, D], where dy is already one row per sorted slot, nothing is weighted and dX stays
per slot: the same parts with the token index and the weights left out (None pointers).

Shape legend: T tokens, K slots per token, S sorted slots, E experts, M tiles, D model dim,
H expert hidden, H1 = 2H when gated else H, P / Q the two dims of a weight gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moekit.backends.triton.align import schedule
from moekit.backends.triton.checks import FLOATS, INDICES, WEIGHTS, check_operand
from moekit.backends.triton.configs import config_by_key, for_dtype, for_wgrad
from moekit.backends.triton.down import combine
from moekit.backends.triton.launch import launch_with_retry
from moekit.backends.triton.ops import triton_op
from moekit.backends.triton.up import (
    Tiles,
    act_code,
    act_fwd,
    act_grad,
    dot_precision,
    gemm_dx,
    tile_of,
)
from moekit.types import ExpertWeights


@triton.jit
def _dh_kernel(
    # pointers
    dy_ptr,  # [T, D] upstream gradient ([S, D] sorted rows when token_ptr is None)
    token_ptr,  # [S] int64 source token of each sorted slot; None: dy rows are sorted rows
    w2_ptr,  # [E, H, D] any strides (read transposed)
    h1_ptr,  # [S, H1] saved pre-activation
    weight_ptr,  # [S] gate weight of each sorted slot; None: unweighted (per-slot outputs)
    dh1_ptr,  # [S, H1] out; may be h1_ptr (each program reads its tile before writing it)
    dwp_ptr,  # [S, cdiv(H, BLOCK_N)] fp32 out: d weight partials per column block; or None
    expert_M_ptr,  # [M] int32 expert of each tile (E = empty)
    row_M_ptr,  # [M] int32 first sorted row of each tile
    offsets_ptr,  # [E + 1] int64 expert row offsets
    # dims
    n_tiles,
    H,
    D,
    E,
    # strides
    stride_dyt,
    stride_dyd,
    stride_we,
    stride_wh,
    stride_wd,
    stride_hm,
    stride_hn,
    stride_gm,
    stride_gn,
    stride_pm,
    # meta-parameters
    BLOCK_M: tl.constexpr,  # tile height, equal to the schedule's
    BLOCK_N: tl.constexpr,  # hidden columns per program
    BLOCK_K: tl.constexpr,  # reduction step over D
    GROUP_M: tl.constexpr,  # tiles per L2 swizzle group
    ACT: tl.constexpr,  # activation code (recomputed from h1)
    GATED: tl.constexpr,  # h1 holds gate then up halves
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32
):
    pid_m, pid_n = tile_of(tl.program_id(0), n_tiles, tl.cdiv(H, BLOCK_N), GROUP_M)
    e = tl.load(expert_M_ptr + pid_m)
    if e >= E:
        return
    rows = tl.load(row_M_ptr + pid_m) + tl.arange(0, BLOCK_M)
    mask_m = rows < tl.load(offsets_ptr + e + 1)
    src = tl.load(token_ptr + rows, mask=mask_m, other=0) if token_ptr is not None else rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < H
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = dy_ptr + src.to(tl.int64)[:, None] * stride_dyt + ks[None, :] * stride_dyd
    w_ptr = w2_ptr + e.to(tl.int64) * stride_we
    b_ptrs = w_ptr + ks[:, None] * stride_wd + cols[None, :] * stride_wh
    g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        mask_k = ks < D - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(a.dtype)
        g = tl.dot(a, b, g, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_dyd
        b_ptrs += BLOCK_K * stride_wd
    mask_o = mask_m[:, None] & mask_n[None, :]
    weight = 1.0  # exact: an unweighted g passes unchanged
    if weight_ptr is not None:
        weight = tl.load(weight_ptr + rows, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    h_ptrs = h1_ptr + rows.to(tl.int64)[:, None] * stride_hm + cols[None, :] * stride_hn
    gate = tl.load(h_ptrs, mask=mask_o, other=0.0).to(tl.float32)
    d_ptrs = dh1_ptr + rows.to(tl.int64)[:, None] * stride_gm + cols[None, :] * stride_gn
    dtype = dh1_ptr.dtype.element_ty
    if GATED:
        up_ = tl.load(h_ptrs + H * stride_hn, mask=mask_o, other=0.0).to(tl.float32)
        act = act_fwd(gate, ACT)
        a_val = act * up_
        tl.store(d_ptrs, (weight * g * up_ * act_grad(gate, ACT)).to(dtype), mask=mask_o)
        tl.store(d_ptrs + H * stride_gn, (weight * g * act).to(dtype), mask=mask_o)
    else:
        a_val = act_fwd(gate, ACT)
        tl.store(d_ptrs, (weight * g * act_grad(gate, ACT)).to(dtype), mask=mask_o)
    if dwp_ptr is not None:  # d weight_s = <g, a_s>, this column block's share
        a_val = a_val.to(dtype).to(tl.float32)  # the forward fed the rounded activation to w2
        partial = tl.sum(tl.where(mask_o, g * a_val, 0.0), 1)
        tl.store(dwp_ptr + rows.to(tl.int64) * stride_pm + pid_n, partial, mask=mask_m)


@triton.jit
def _scaled_act_kernel(
    # pointers
    h1_ptr,  # [S, H1] saved pre-activation
    weight_ptr,  # [S] gate weight of each sorted slot; None: act(h1) unscaled
    offsets_ptr,  # [E + 1] int64; rows past offsets[E] are dropped and skipped
    out_ptr,  # [S, H] out: weight * act(h1), kept rows only
    # dims
    H,
    E,
    # strides
    stride_hm,
    stride_hn,
    stride_om,
    stride_on,
    # meta-parameters
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_H: tl.constexpr,  # columns per program
    ACT: tl.constexpr,  # activation code
    GATED: tl.constexpr,  # h1 holds gate then up halves
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_m = rows < tl.load(offsets_ptr + E)
    mask = mask_m[:, None] & (cols < H)[None, :]
    h_ptrs = h1_ptr + rows.to(tl.int64)[:, None] * stride_hm + cols[None, :] * stride_hn
    a = act_fwd(tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32), ACT)
    if GATED:
        a *= tl.load(h_ptrs + H * stride_hn, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    a = a.to(dtype).to(tl.float32)  # the forward fed the rounded activation to w2
    if weight_ptr is not None:
        a = a * tl.load(weight_ptr + rows, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(o_ptrs, a.to(dtype), mask=mask)


def _scaled_act(
    h1_SH1: Tensor, weight_S: Tensor | None, offsets_E1: Tensor, activation: str
) -> Tensor:
    """[S, H] weight * act(h1) (weight None: act(h1)) for the kept rows: dW2's left operand."""
    code, gated = act_code(activation)
    S, H1 = h1_SH1.shape
    if weight_S is not None:
        check_operand("weight_S", weight_S, (S,), WEIGHTS, h1_SH1.device, contiguous=True)
    H = H1 // 2 if gated else H1
    out = h1_SH1.new_empty(S, H)
    block_r, block_h = (16, 16) if h1_SH1.device.type == "cpu" else (32, 256)
    grid = (triton.cdiv(S, block_r), triton.cdiv(H, block_h))
    _scaled_act_kernel[grid](
        h1_SH1, weight_S, offsets_E1, out, H, offsets_E1.shape[0] - 1,
        *h1_SH1.stride(), *out.stride(),
        BLOCK_R=block_r, BLOCK_H=block_h, ACT=code, GATED=gated,
    )  # fmt: skip
    return out


@triton.jit
def _wgrad_kernel(
    # pointers
    left_ptr,  # [rows, P] (or [rows, 2P] pre-activation when LEFT_ACT and GATED)
    left_idx_ptr,  # [S] int64 row of left per sorted slot (x[token]); None: sorted rows
    right_ptr,  # [rows, Q]
    right_idx_ptr,  # [S] int64 row of right per sorted slot (dy[token]); None: sorted rows
    scale_ptr,  # [S] per-slot scale of right rows (the gate weight); None: unscaled
    out_ptr,  # [E, P, Q] out, any strides (the weight's own layout)
    dbias_ptr,  # [E, Q] out: column sums of right (the bias gradient); None: not wanted
    offsets_ptr,  # [E + 1] int64 expert row offsets
    # dims
    P,
    Q,
    # strides
    stride_lm,
    stride_lp,
    stride_rm,
    stride_rq,
    stride_oe,
    stride_op,
    stride_oq,
    stride_be,
    stride_bq,
    # meta-parameters
    BLOCK_M: tl.constexpr,  # sorted rows reduced per step
    BLOCK_P: tl.constexpr,  # output rows per program
    BLOCK_Q: tl.constexpr,  # output columns per program
    LEFT_ACT: tl.constexpr,  # left is h1: recompute act (code) from it, 0 = use as is
    GATED: tl.constexpr,  # with LEFT_ACT: left = act(gate) * up
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32
):
    pid = tl.program_id(0)
    e = tl.program_id(1)
    n_q = tl.cdiv(Q, BLOCK_Q)
    pid_p, pid_q = pid // n_q, pid % n_q
    lo = tl.load(offsets_ptr + e)
    hi = tl.load(offsets_ptr + e + 1)
    ps = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = ps < P
    mask_q = qs < Q
    dtype = right_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask_m = rows < hi
        lrow = rows if left_idx_ptr is None else tl.load(left_idx_ptr + rows, mask=mask_m, other=0)
        rrow = (
            rows if right_idx_ptr is None else tl.load(right_idx_ptr + rows, mask=mask_m, other=0)
        )
        mask_l = mask_m[:, None] & mask_p[None, :]
        l_ptrs = left_ptr + lrow.to(tl.int64)[:, None] * stride_lm + ps[None, :] * stride_lp
        left = tl.load(l_ptrs, mask=mask_l, other=0.0)
        if LEFT_ACT != 0:
            left = act_fwd(left.to(tl.float32), LEFT_ACT)
            if GATED:
                left *= tl.load(l_ptrs + P * stride_lp, mask=mask_l, other=0.0).to(tl.float32)
            left = left.to(dtype)
        r_ptrs = right_ptr + rrow.to(tl.int64)[:, None] * stride_rm + qs[None, :] * stride_rq
        right = tl.load(r_ptrs, mask=mask_m[:, None] & mask_q[None, :], other=0.0)
        if scale_ptr is not None:
            scale = tl.load(scale_ptr + rows, mask=mask_m, other=0.0).to(tl.float32)
            right = (right.to(tl.float32) * scale[:, None]).to(dtype)
        acc = tl.dot(tl.trans(left.to(dtype)), right, acc, input_precision=PRECISION)
        if dbias_ptr is not None:
            dbias += tl.sum(right.to(tl.float32), 0)
    o_ptrs = out_ptr + e.to(tl.int64) * stride_oe
    o_ptrs += ps[:, None] * stride_op + qs[None, :] * stride_oq
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_q[None, :])
    if dbias_ptr is not None and pid_p == 0:
        b_ptrs = dbias_ptr + e.to(tl.int64) * stride_be + qs * stride_bq
        tl.store(b_ptrs, dbias.to(dbias_ptr.dtype.element_ty), mask=mask_q)


def _wgrad(
    left: Tensor,
    right: Tensor,
    out: Tensor,
    dbias: Tensor | None,
    offsets_E1: Tensor,
    cfg: dict,
    left_idx: Tensor | None = None,
    right_idx: Tensor | None = None,
    scale: Tensor | None = None,
    activation: str | None = None,
) -> None:
    """out[e] = left[rows of e]^T @ right[rows of e] (dbias[e] = column sums of right)."""
    E, P, Q = out.shape
    dev = right.device
    check_operand("offsets_E1", offsets_E1, (E + 1,), INDICES, dev, contiguous=True)
    for name, index in (("left_idx", left_idx), ("right_idx", right_idx), ("scale", scale)):
        if index is not None:
            dtypes = WEIGHTS if name == "scale" else INDICES
            check_operand(name, index, (None,), dtypes, dev, contiguous=True)
    code, gated = act_code(activation) if activation is not None else (0, False)
    cfg = for_wgrad(cfg, left.dtype, right.dtype)

    def run(c: dict) -> None:
        grid = (triton.cdiv(P, c["block_p"]) * triton.cdiv(Q, c["block_q"]), E)
        _wgrad_kernel[grid](
            left, left_idx, right, right_idx, scale, out, dbias, offsets_E1,
            P, Q,
            *left.stride(), *right.stride(), *out.stride(),
            *(dbias.stride() if dbias is not None else (0, 0)),
            BLOCK_M=c["block_m"], BLOCK_P=c["block_p"], BLOCK_Q=c["block_q"],
            LEFT_ACT=code, GATED=gated, PRECISION=dot_precision(right.dtype),
            num_warps=c["num_warps"], num_stages=c["num_stages"],
        )  # fmt: skip

    extra = (left.dtype, right.dtype, out.dtype)
    launch_with_retry("wgrad", cfg, run, ("block_m", "block_q", "block_p"), extra)


def _wgrad_config(cfg: dict, dtype: torch.dtype) -> dict:
    """The wgrad tiles; two fp32 operands per stage only fit 2 stages of 64 x 64."""
    wg = cfg["wgrad"]
    if dtype != torch.float32:
        return wg
    return dict(wg, block_p=min(wg["block_p"], 64), block_q=min(wg["block_q"], 64), num_stages=2)


def _grad_w2(
    h1_SH1: Tensor,
    dy: Tensor,
    token_S: Tensor | None,
    weight_S: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    offsets_E1: Tensor,
    activation: str,
    wg: dict,
) -> tuple[Tensor, Tensor]:
    """(dW2, db2 or empty): dW2[e] = (weight * act(h1))^T dy[token] over expert e's rows."""
    dw2 = torch.empty_like(w2)
    db2 = torch.empty_like(b2) if b2 is not None else w2.new_empty(0)
    if b2 is None:  # weight * a materialised once, then a plain GEMM loop
        aw_SH = _scaled_act(h1_SH1, weight_S, offsets_E1, activation)
        _wgrad(aw_SH, dy, dw2, None, offsets_E1, wg, right_idx=token_S)
        del aw_SH  # freed before dW1 is allocated: the peak stays at h1 + dW1 + dW2
    else:  # db2 needs weight * dy rows: recompute a and scale dy inside the loop
        _wgrad(
            h1_SH1, dy, dw2, db2, offsets_E1, wg,
            right_idx=token_S, scale=weight_S, activation=activation,
        )  # fmt: skip
    return dw2, db2


def _dh(
    dy: Tensor,
    token_S: Tensor | None,
    weight_S: Tensor | None,
    w2: Tensor,
    h1_SH1: Tensor,
    tiles: Tiles,
    activation: str,
    cfg: dict,
) -> Tensor | None:
    """Overwrite h1 with dh1 = weight * (dy[token] @ w2[e]^T) * act'(h1); return the d weight
    partials [S, column blocks] (None when unweighted). dW2 must have read h1 already."""
    code, gated = act_code(activation)
    S, H, D = h1_SH1.shape[0], w2.shape[1], w2.shape[2]
    dh_cfg = for_dtype(cfg["dh"], dy.dtype, w2.dtype, tiles.block_m)
    n_tiles = tiles.count(S)
    if not n_tiles:
        if weight_S is None:
            return None
        return torch.zeros(S, triton.cdiv(H, dh_cfg["block_n"]), dtype=torch.float32,
                           device=dy.device)  # fmt: skip
    dwp = None

    def run(c: dict) -> None:
        nonlocal dwp
        n_blocks_h = triton.cdiv(H, c["block_n"])
        if weight_S is not None:  # partials per column block: sized by the config that runs
            dwp = torch.zeros(S, n_blocks_h, dtype=torch.float32, device=dy.device)
        dh1 = h1_SH1  # in place: each program reads its tile of h1 before writing it
        _dh_kernel[(n_tiles * n_blocks_h,)](
            dy, token_S, w2, h1_SH1, weight_S, dh1, dwp,
            tiles.expert_M, tiles.row_M, tiles.offsets_E1,
            n_tiles, H, D, tiles.offsets_E1.shape[0] - 1,
            *dy.stride(), *w2.stride(), *h1_SH1.stride(), *dh1.stride(),
            dwp.stride(0) if dwp is not None else 0,
            BLOCK_M=tiles.block_m, BLOCK_N=c["block_n"], BLOCK_K=c["block_k"],
            GROUP_M=c["group_m"], ACT=code, GATED=gated, PRECISION=dot_precision(dy.dtype),
            num_warps=c["num_warps"], num_stages=c["num_stages"],
        )  # fmt: skip

    extra = (tiles.block_m, gated, dy.dtype, w2.dtype)
    launch_with_retry("dh", dh_cfg, run, extra=extra)
    return dwp


def _bias_dweight(dy_TD: Tensor, token_S: Tensor, b2: Tensor, offsets_E1: Tensor) -> Tensor:
    """[S] fp32 <dy[token], b2[e]> per kept slot: out = a @ w2 + b2 also feeds d weight."""
    E, S = b2.shape[0], token_S.shape[0]
    rows_S = torch.arange(S, device=dy_TD.device)
    expert_S = torch.searchsorted(offsets_E1[1:], rows_S, right=True)
    bias_SD = b2.index_select(0, expert_S.clamp_max(E - 1)).to(torch.float32)
    extra = (dy_TD.index_select(0, token_S).to(torch.float32) * bias_SD).sum(1)
    return torch.where(expert_S < E, extra, 0.0)


def _grad_w1(
    x: Tensor,
    dh1_SH1: Tensor,
    token_S: Tensor | None,
    w1: Tensor,
    b1: Tensor | None,
    offsets_E1: Tensor,
    wg: dict,
) -> tuple[Tensor, Tensor]:
    """(dW1, db1 or empty): dW1[e] = x[token]^T dh1 over expert e's rows."""
    dw1 = torch.empty_like(w1)
    db1 = torch.empty_like(b1) if b1 is not None else w1.new_empty(0)
    _wgrad(x, dh1_SH1, dw1, db1 if b1 is not None else None, offsets_E1, wg, left_idx=token_S)
    return dw1, db1


def _check_backward(dy: Tensor, x: Tensor, h1_SH1: Tensor, w1: Tensor, w2: Tensor) -> None:
    dev = x.device
    check_operand("w1", w1, (None, x.shape[1], None), FLOATS, dev)
    check_operand("w2", w2, (w1.shape[0], None, x.shape[1]), FLOATS, dev)
    check_operand("h1_SH1", h1_SH1, (None, w1.shape[2]), FLOATS, dev)
    check_operand("dy", dy, (None, x.shape[1]), FLOATS, dev)


def _weight_grads(
    dy: Tensor,
    x: Tensor,
    h1_SH1: Tensor,
    token_S: Tensor | None,
    weight_S: Tensor | None,
    offsets_E1: Tensor,
    w: ExpertWeights,
    activation: str,
    cfg_key: str,
) -> tuple[Tiles, dict, tuple[Tensor, Tensor, Tensor, Tensor], Tensor | None]:
    """The parts both ops share: (tiles, dX config, (dw1, dw2, db1, db2), d weight [S] fp32 or
    None when unweighted). h1_SH1 holds dh1 on return, ready for dX."""
    w1, w2, b1, b2 = w.tensors
    _check_backward(dy, x, h1_SH1, w1, w2)
    cfg = config_by_key(x.device, cfg_key)
    S, block_m = (token_S if token_S is not None else x).shape[0], cfg["block_m"]
    tiles = Tiles(offsets_E1, block_m, *schedule(offsets_E1, S, block_m))
    dy = dy.contiguous()
    wg = _wgrad_config(cfg, x.dtype)
    dw2, db2 = _grad_w2(h1_SH1, dy, token_S, weight_S, w2, b2, offsets_E1, activation, wg)
    dwp = _dh(dy, token_S, weight_S, w2, h1_SH1, tiles, activation, cfg)
    dweight = dwp.sum(1) if dwp is not None else None
    if dweight is not None and b2 is not None:
        dweight = dweight + _bias_dweight(dy, token_S, b2, offsets_E1)
    dw1, db1 = _grad_w1(x, h1_SH1, token_S, w1, b1, offsets_E1, wg)
    return tiles, cfg["dx"], (dw1, dw2, db1, db2), dweight


def _fake_grads(
    x: Tensor, w1: Tensor, w2: Tensor, b1: Tensor | None, b2: Tensor | None
) -> tuple[Tensor, ...]:
    """Empty (dx, dw1, dw2, db1, db2) for the fakes: the shapes of the real ops' outputs."""
    return (
        torch.empty_like(x),
        torch.empty_like(w1),
        torch.empty_like(w2),
        torch.empty_like(b1) if b1 is not None else w1.new_empty(0),
        torch.empty_like(b2) if b2 is not None else w2.new_empty(0),
    )


@triton_op("moekit_triton::backward", mutates_args=("h1_SH1",))
def backward(
    dy_TD: Tensor,
    x_TD: Tensor,
    h1_SH1: Tensor,
    token_S: Tensor,
    weight_S: Tensor,
    inv_S: Tensor,
    kept_TK: Tensor,
    offsets_E1: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Tensor | None,
    b2: Tensor | None,
    activation: str,
    cfg_key: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw1, dw2, db1, db2, dweight_S) of the fused y; db1 / db2 are empty when the bias
    is None. h1_SH1 is consumed: it holds dh1 on return."""
    w = ExpertWeights(w1, w2, b1, b2)
    tiles, dx_cfg, grads, dweight = _weight_grads(
        dy_TD, x_TD, h1_SH1, token_S, weight_S, offsets_E1, w, activation, cfg_key
    )
    # dX: per-slot rows dh1 @ w1[e]^T, summed per token in slot order
    dx = combine(gemm_dx(h1_SH1, w1, tiles, dx_cfg), inv_S, None, kept_TK, x_TD.shape[0])
    return dx, *grads, dweight.to(weight_S.dtype)


@backward.register_fake
def _(dy_TD, x_TD, h1_SH1, token_S, weight_S, inv_S, kept_TK, offsets_E1, w1, w2, b1, b2, act, key):
    return *_fake_grads(x_TD, w1, w2, b1, b2), torch.empty_like(weight_S)


@triton_op("moekit_triton::backward_per_slot", mutates_args=("h1_SH1",))
def backward_per_slot(
    dout_SD: Tensor,
    x_SD: Tensor,
    h1_SH1: Tensor,
    offsets_E1: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Tensor | None,
    b2: Tensor | None,
    activation: str,
    cfg_key: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx_SD, dw1, dw2, db1, db2) of the per-slot outputs; dx_SD is zero past the kept rows,
    db1 / db2 are empty when the bias is None. h1_SH1 holds dh1 on return."""
    w = ExpertWeights(w1, w2, b1, b2)
    tiles, dx_cfg, grads, _ = _weight_grads(
        dout_SD, x_SD, h1_SH1, None, None, offsets_E1, w, activation, cfg_key
    )
    return gemm_dx(h1_SH1, w1, tiles, dx_cfg, zero_tail=True), *grads


@backward_per_slot.register_fake
def _(dout_SD, x_SD, h1_SH1, offsets_E1, w1, w2, b1, b2, activation, cfg_key):
    return _fake_grads(x_SD, w1, w2, b1, b2)
