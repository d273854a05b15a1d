"""The grouped GEMM every projection runs on, its three launchers, and the fused `up` op.

`_grouped_gemm_kernel` computes, for each BLOCK_M tile of sorted rows of one expert e,
out = act(A[rows] @ B[e] + bias[e]). Its launchers:
  `gemm_up`    x rows gathered by token_S inside the kernel (no x[token] copy), w1, b1, the
               activation epilogue, optionally the pre-activation h1 and the inverse sort;
  `gemm_down`  a @ w2[e] + b2[e];
  `gemm_dx`    dh1 @ w1[e]^T for the backward (w1 read transposed through its strides).
Optional operands are None pointers, which Triton compiles out, so the kernel needs no flags
or dummy pointers for them.

Shape legend: T tokens, S sorted token-slots, E experts, M tiles, D model dim, H expert hidden,
H1 = 2H for gated activations (gate half first, up half second) else H.
Activation codes: 0 identity, 1 gelu (erf form, as F.gelu), 2 relu, 3 silu.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from moekit.backends.triton.align import block_e, find_tile, max_tiles
from moekit.backends.triton.checks import FLOATS, INDICES, check_operand
from moekit.backends.triton.configs import config_by_key, for_dtype
from moekit.backends.triton.decode import spread
from moekit.backends.triton.launch import launch_with_retry
from moekit.backends.triton.ops import triton_op
from moekit.types import GATED_ACTIVATIONS

ACT_CODE = {"gelu": 1, "relu": 2, "silu": 3, "swiglu": 3, "geglu": 1, "reglu": 2}


def act_code(activation: str) -> tuple[int, bool]:
    """(kernel activation code, gated) for an activation name of `moekit.experts`."""
    if activation not in ACT_CODE:
        raise ValueError(f"activation must be one of {sorted(ACT_CODE)}, got {activation!r}")
    return ACT_CODE[activation], activation in GATED_ACTIVATIONS


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's matmul flag (ieee unless TF32 is allowed), like the torch backend."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@triton.jit
def act_fwd(x, ACT: tl.constexpr):
    """Elementwise activation in fp32 (ACT: code from ACT_CODE, 0 = identity)."""
    if ACT == 1:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:
        return tl.maximum(x, 0.0)
    elif ACT == 3:
        return x * tl.sigmoid(x)
    else:
        return x


@triton.jit
def act_grad(x, ACT: tl.constexpr):
    """d act / dx in fp32; relu's is 0 at 0 as in torch."""
    if ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        return cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACT == 2:
        return (x > 0.0).to(tl.float32)
    elif ACT == 3:
        s = tl.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    else:
        return tl.full(x.shape, 1.0, tl.float32)


@triton.jit
def tile_of(pid, n_tiles, n_blocks_n, GROUP_M: tl.constexpr):
    """(tile, column block) of a 1-D program id; GROUP_M tiles share each weight block in L2."""
    group = GROUP_M * n_blocks_n
    first = (pid // group) * GROUP_M
    size = tl.minimum(n_tiles - first, GROUP_M)
    return first + (pid % group) % size, (pid % group) // size


@triton.jit
def _grouped_gemm_kernel(
    # pointers
    a_ptr,  # [rows of A, K] left operand: x when gather_ptr is given, else sorted rows
    b_ptr,  # [E, K, N or 2N] per-expert right operand, any strides
    out_ptr,  # [S, N] out
    offsets_ptr,  # [E + 1] int64 expert row offsets
    gather_ptr,  # [S] int64 row of A for each sorted row (token_S); None: A is sorted already
    bias_ptr,  # [E, N or 2N]; None: no bias
    pre_ptr,  # [S, N or 2N] out: pre-activation, saved for backward; None: not stored
    order_ptr,  # [S] int64 flat slot id of each sorted row; None: no inverse written
    inv_ptr,  # [S] int32 out: sorted row of each kept flat slot; None when order_ptr is
    expert_M_ptr,  # [M] int32 expert of each tile (E = empty); None: found from the offsets
    row_M_ptr,  # [M] int32 first sorted row of each tile; None when expert_M_ptr is
    # dims
    n_tiles,
    N,  # output columns (H for a gated up-projection: the kernel reads 2N columns of B)
    K,
    E,
    # strides
    stride_am,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bn,
    stride_ce,
    stride_cn,
    stride_pm,
    stride_pn,
    stride_om,
    stride_on,
    # meta-parameters
    BLOCK_M: tl.constexpr,  # tile height, equal to the schedule's
    BLOCK_N: tl.constexpr,  # output columns per program
    BLOCK_K: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # tiles per L2 swizzle group
    ACT: tl.constexpr,  # epilogue activation code
    GATED: tl.constexpr,  # two accumulators (gate, up); out = act(gate) * up
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 ("ieee" or "tf32")
    BLOCK_E: tl.constexpr,  # next power of two >= E, for the inline tile lookup
):
    pid_m, pid_n = tile_of(tl.program_id(0), n_tiles, tl.cdiv(N, BLOCK_N), GROUP_M)
    if expert_M_ptr is None:  # decode: find the tile here (one launch less)
        e, row0 = find_tile(pid_m, offsets_ptr, E, BLOCK_M, BLOCK_E)
    else:
        e = tl.load(expert_M_ptr + pid_m)
        row0 = tl.load(row_M_ptr + pid_m)
    if e >= E:  # past the real tile count: nothing to do
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    mask_m = rows < tl.load(offsets_ptr + e + 1)
    if order_ptr is not None and pid_n == 0:  # invert the sort for the combine (two launches less)
        slot = tl.load(order_ptr + rows, mask=mask_m, other=0)
        tl.store(inv_ptr + slot, rows, mask=mask_m)
    # fused x[token_S] when gathering
    src = tl.load(gather_ptr + rows, mask=mask_m, other=0) if gather_ptr is not None else rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + src.to(tl.int64)[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + e.to(tl.int64) * stride_be
    b_ptrs += ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = ks < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        mask_b = mask_k[:, None] & mask_n[None, :]
        b = tl.load(b_ptrs, mask=mask_b, other=0.0).to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if GATED:
            b_up = tl.load(b_ptrs + N * stride_bn, mask=mask_b, other=0.0).to(a.dtype)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if bias_ptr is not None:  # before the activation
        c_ptrs = bias_ptr + e.to(tl.int64) * stride_ce + cols * stride_cn
        acc += tl.load(c_ptrs, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GATED:
            bias_up = tl.load(c_ptrs + N * stride_cn, mask=mask_n, other=0.0)
            acc_up += bias_up.to(tl.float32)[None, :]
    mask_o = mask_m[:, None] & mask_n[None, :]
    if pre_ptr is not None:  # training
        p_ptrs = pre_ptr + rows.to(tl.int64)[:, None] * stride_pm + cols[None, :] * stride_pn
        tl.store(p_ptrs, acc.to(pre_ptr.dtype.element_ty), mask=mask_o)
        if GATED:
            tl.store(p_ptrs + N * stride_pn, acc_up.to(pre_ptr.dtype.element_ty), mask=mask_o)
    out = act_fwd(acc, ACT)
    if GATED:
        out = out * acc_up
    o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_o)


@dataclass(frozen=True)
class Tiles:
    """How a grouped kernel's programs find their tile: an `align.schedule`, or inline."""

    offsets_E1: Tensor  # [E + 1] int64 expert row offsets of the sorted rows
    block_m: int  # tile height
    expert_M: Tensor | None = None  # [M] int32 from align.schedule; None: found inline
    row_M: Tensor | None = None  # [M] int32, given with expert_M

    def count(self, n_rows: int) -> int:
        """Programs along M: the schedule's length, or the static bound when found inline."""
        if self.expert_M is not None:
            return self.expert_M.shape[0]
        return max_tiles(n_rows, self.offsets_E1.shape[0] - 1, self.block_m)

    def check(self, n_experts: int, device: torch.device) -> None:
        check_operand("offsets_E1", self.offsets_E1, (n_experts + 1,), INDICES, device, True)
        if self.expert_M is not None:
            check_operand("expert_M", self.expert_M, (None,), (torch.int32,), device, True)
            check_operand("row_M", self.row_M, self.expert_M.shape, (torch.int32,), device, True)


def _check_gemm(a_name: str, a: Tensor, b_name: str, b: Tensor, tiles: Tiles) -> None:
    """A [rows, K] and per-expert B [E, K, N] on one device, and a tile source for E experts."""
    check_operand(b_name, b, (None, None, None), FLOATS, a.device)
    check_operand(a_name, a, (None, b.shape[1]), FLOATS, a.device)
    tiles.check(b.shape[0], a.device)


def _strides(t: Tensor | None) -> tuple[int, int]:
    return t.stride() if t is not None else (0, 0)


def _launch(
    a: Tensor,
    b: Tensor,
    out: Tensor,
    tiles: Tiles,
    cfg: dict,
    activation: str | None = None,
    *,
    gather: Tensor | None = None,
    bias: Tensor | None = None,
    pre: Tensor | None = None,
    order: Tensor | None = None,
    inv: Tensor | None = None,
) -> None:
    """The one launch site of `_grouped_gemm_kernel` (operands already checked)."""
    code, gated = act_code(activation) if activation is not None else (0, False)
    E, K, _ = b.shape
    n_tiles, N = tiles.count(out.shape[0]), out.shape[1]
    if n_tiles == 0 or N == 0:
        return
    # B is staged in its own dtype (fp32 master weights under bf16 autocast): size for both
    cfg = for_dtype(cfg, a.dtype, b.dtype, tiles.block_m, 2 if gated else 1)
    cfg = spread(cfg, n_tiles, N, a.device)

    def run(c: dict) -> None:
        _grouped_gemm_kernel[(n_tiles * triton.cdiv(N, c["block_n"]),)](
            a, b, out, tiles.offsets_E1, gather, bias, pre, order, inv, tiles.expert_M,
            tiles.row_M, n_tiles, N, K, E,
            *a.stride(), *b.stride(), *_strides(bias), *_strides(pre), *out.stride(),
            BLOCK_M=tiles.block_m, BLOCK_N=c["block_n"], BLOCK_K=c["block_k"],
            GROUP_M=c["group_m"], ACT=code, GATED=gated, PRECISION=dot_precision(a.dtype),
            BLOCK_E=block_e(E), num_warps=c["num_warps"], num_stages=c["num_stages"],
        )  # fmt: skip

    extra = (tiles.block_m, gated, a.dtype, b.dtype)
    launch_with_retry("grouped_gemm", cfg, run, extra=extra)


def gemm_up(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    tiles: Tiles,
    cfg: dict,
    activation: str,
    token_S: Tensor | None = None,
    order_S: Tensor | None = None,
    store_pre: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """(h1 [S, H1] or [0, H1], a [S, H], inv [S] or [0] int32): a = act(x[token] @ w1[e] + b1[e]).

    token_S None: x is the sorted rows already. store_pre keeps h1 for the backward; order_S
    also writes inv[order_S[row]] = row for the kept rows (the combine's index).
    """
    _check_gemm("x", x, "w1", w1, tiles)
    E, _, H1 = w1.shape
    S = token_S.shape[0] if token_S is not None else x.shape[0]
    for name, index in (("token_S", token_S), ("order_S", order_S)):
        if index is not None:
            check_operand(name, index, (S,), INDICES, x.device, contiguous=True)
    if b1 is not None:
        check_operand("b1", b1, (E, H1), FLOATS, x.device)
    H = H1 // 2 if act_code(activation)[1] else H1
    a = x.new_empty(S, H)
    h1 = x.new_empty(S if store_pre else 0, H1)
    inv = torch.empty(S if order_S is not None else 0, dtype=torch.int32, device=x.device)
    _launch(
        x, w1, a, tiles, cfg, activation,
        gather=token_S, bias=b1, pre=h1 if store_pre else None,
        order=order_S, inv=inv if order_S is not None else None,
    )  # fmt: skip
    return h1, a, inv


def gemm_down(
    a_SH: Tensor, w2: Tensor, b2: Tensor | None, tiles: Tiles, cfg: dict, zero_tail: bool = False
) -> Tensor:
    """out [S, D] = a @ w2[e] + b2[e] per kept sorted row; the rows past them are left
    unwritten, or zero with zero_tail."""
    _check_gemm("a_SH", a_SH, "w2", w2, tiles)
    if b2 is not None:
        check_operand("b2", b2, (w2.shape[0], w2.shape[2]), FLOATS, a_SH.device)
    alloc = a_SH.new_zeros if zero_tail else a_SH.new_empty
    out = alloc(a_SH.shape[0], w2.shape[2])
    _launch(a_SH, w2, out, tiles, cfg, bias=b2)
    return out


def gemm_dx(
    dh1_SH1: Tensor, w1: Tensor, tiles: Tiles, cfg: dict, zero_tail: bool = False
) -> Tensor:
    """dx [S, D] = dh1 @ w1[e]^T per kept sorted row (rows past them as in `gemm_down`)."""
    w1_t = w1.transpose(1, 2)  # [E, H1, D], a view: the kernel reads through the strides
    _check_gemm("dh1", dh1_SH1, "w1^T", w1_t, tiles)
    alloc = dh1_SH1.new_zeros if zero_tail else dh1_SH1.new_empty
    out = alloc(dh1_SH1.shape[0], w1.shape[1])
    _launch(dh1_SH1, w1_t, out, tiles, cfg)
    return out


@triton_op("moekit_triton::up")
def up(
    x: Tensor,
    token_S: Tensor | None,
    order_S: Tensor | None,
    w1: Tensor,
    b1: Tensor | None,
    expert_M: Tensor | None,
    row_M: Tensor | None,
    offsets_E1: Tensor,
    activation: str,
    block_m: int,
    cfg_key: str,
    store_pre: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """`gemm_up` as an op: (h1 pre-activation or [0, H1] at inference, a [S, H], inv)."""
    tiles = Tiles(offsets_E1, block_m, expert_M, row_M)
    cfg = config_by_key(x.device, cfg_key)["up"]
    return gemm_up(x, w1, b1, tiles, cfg, activation, token_S, order_S, store_pre)


@up.register_fake
def _(x, token_S, order_S, w1, b1, expert_M, row_M, offsets_E1, activation, block_m, key, pre):
    H1 = w1.shape[2]
    H = H1 // 2 if activation in GATED_ACTIVATIONS else H1
    S = token_S.shape[0] if token_S is not None else x.shape[0]
    inv = x.new_empty(S if order_S is not None else 0, dtype=torch.int32)
    return x.new_empty(S if pre else 0, H1), x.new_empty(S, H), inv
