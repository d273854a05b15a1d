"""Fused up-projection: gather rows of x by the sorted slot order -> grouped GEMM with w1
-> bias -> activation epilogue -> h. The same grouped-GEMM kernel (no gather, no activation)
serves the down-projection and the dX product of the backward pass.

Shape legend: T tokens, S sorted token-slots, E experts, M tiles, D model dim, H expert hidden,
H1 = 2H for gated activations (gate half first, up half second) else H.
Activation codes: 0 identity, 1 gelu (erf form, as F.gelu), 2 relu, 3 silu.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moekit.backends.triton.align import max_tiles
from moekit.backends.triton.configs import config_by_key, for_dtype
from moekit.backends.triton.decode import spread
from moekit.config import GATED_ACTIVATIONS

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
def find_tile(pid_m, offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, first sorted row) of tile pid_m from the offsets: align.py's schedule, inline."""
    e_vec = tl.arange(0, BLOCK_E)
    mask_e = e_vec < E
    lo = tl.load(offsets_ptr + e_vec, mask=mask_e, other=0).to(tl.int32)
    hi = tl.load(offsets_ptr + e_vec + 1, mask=mask_e, other=0).to(tl.int32)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    end = tl.cumsum(tiles, 0)
    base = lo - (end - tiles) * BLOCK_M
    end = tl.where(mask_e, end, 2147483647)
    e = tl.sum((end <= pid_m).to(tl.int32), 0)
    return e, tl.sum(tl.where(e_vec == e, base, 0), 0) + pid_m * BLOCK_M


@triton.jit
def _grouped_gemm_kernel(
    # pointers
    a_ptr,  # [rows of A, K] left operand (x when gathering, else sorted rows)
    gather_ptr,  # [S] int64 source row of A for each sorted row (token_S); unused if not GATHER
    order_ptr,  # [S] int64 flat slot id of each sorted row; unused if not WRITE_INV
    inv_ptr,  # [S] int32 out: sorted row of each kept flat slot; unused if not WRITE_INV
    b_ptr,  # [E, K, N or 2N] per-expert right operand, any strides
    bias_ptr,  # [E, N or 2N]; unused if not HAS_BIAS
    pre_ptr,  # [S, N or 2N] out: pre-activation (saved for backward); unused if not STORE_PRE
    out_ptr,  # [S, N] out
    expert_M_ptr,  # [M] int32 expert of each tile (E = empty tile); unused if INLINE_SCHEDULE
    row_M_ptr,  # [M] int32 first sorted row of each tile; unused if INLINE_SCHEDULE
    offsets_ptr,  # [E + 1] int64 expert row offsets
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
    GATHER: tl.constexpr,  # A rows come through gather_ptr (fused x[token_S])
    ACT: tl.constexpr,  # epilogue activation code
    GATED: tl.constexpr,  # two accumulators (gate, up); out = act(gate) * up
    HAS_BIAS: tl.constexpr,  # add bias before the activation
    STORE_PRE: tl.constexpr,  # also write the pre-activation (training)
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 ("ieee" or "tf32")
    WRITE_INV: tl.constexpr,  # also invert the sort for the combine (saves two launches)
    INLINE_SCHEDULE: tl.constexpr,  # find the tile from the offsets here (decode: one launch less)
    BLOCK_E: tl.constexpr,  # next power of two >= E, for INLINE_SCHEDULE
):
    pid_m, pid_n = tile_of(tl.program_id(0), n_tiles, tl.cdiv(N, BLOCK_N), GROUP_M)
    if INLINE_SCHEDULE:
        e, row0 = find_tile(pid_m, offsets_ptr, E, BLOCK_M, BLOCK_E)
    else:
        e = tl.load(expert_M_ptr + pid_m)
        row0 = tl.load(row_M_ptr + pid_m)
    if e >= E:  # past the real tile count: nothing to do
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    mask_m = rows < tl.load(offsets_ptr + e + 1)
    if WRITE_INV and pid_n == 0:
        slot = tl.load(order_ptr + rows, mask=mask_m, other=0)
        tl.store(inv_ptr + slot, rows, mask=mask_m)
    src = tl.load(gather_ptr + rows, mask=mask_m, other=0) if GATHER else rows
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
    if HAS_BIAS:
        c_ptrs = bias_ptr + e.to(tl.int64) * stride_ce + cols * stride_cn
        acc += tl.load(c_ptrs, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GATED:
            bias_up = tl.load(c_ptrs + N * stride_cn, mask=mask_n, other=0.0)
            acc_up += bias_up.to(tl.float32)[None, :]
    mask_o = mask_m[:, None] & mask_n[None, :]
    if STORE_PRE:
        p_ptrs = pre_ptr + rows.to(tl.int64)[:, None] * stride_pm + cols[None, :] * stride_pn
        tl.store(p_ptrs, acc.to(pre_ptr.dtype.element_ty), mask=mask_o)
        if GATED:
            tl.store(p_ptrs + N * stride_pn, acc_up.to(pre_ptr.dtype.element_ty), mask=mask_o)
    out = act_fwd(acc, ACT)
    if GATED:
        out = out * acc_up
    o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_o)


def grouped_gemm(
    a: Tensor,
    b_EKN: Tensor,
    schedule: tuple[Tensor, Tensor] | None,
    offsets_E1: Tensor,
    n_rows: int,
    cfg: dict,
    block_m: int,
    gather_S: Tensor | None = None,
    bias: Tensor | None = None,
    activation: str | None = None,
    store_pre: bool = False,
    inverse: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """out [S, N] = act(A[rows] @ B[e] + bias[e]) per tile; returns (pre [S, N1] or empty, out).

    A is x [T, K] gathered through gather_S, or sorted rows [S, K]. B [E, K, N1] by strides,
    N1 = 2N when the activation is gated. Rows past offsets_E1[E] are left unwritten.
    inverse = (order_S, inv_S): also write inv_S[order_S[row]] = row for the kept rows.
    schedule None: each program finds its tile from the offsets (no schedule launch).
    """
    code, gated = act_code(activation) if activation is not None else (0, False)
    cfg = for_dtype(cfg, a.dtype)
    E, K, N1 = b_EKN.shape
    if a.shape[1] != K:
        raise ValueError(f"A has {a.shape[1]} columns, B expects K={K}")
    N = N1 // 2 if gated else N1
    out = a.new_empty(n_rows, N)
    pre = a.new_empty(n_rows if store_pre else 0, N1)
    if schedule is None:
        n_tiles = max_tiles(n_rows, E, block_m)
        expert_M = row_M = offsets_E1
    else:
        expert_M, row_M = schedule
        n_tiles = expert_M.shape[0]
    if n_tiles == 0 or N == 0:
        return pre, out
    cfg = spread(cfg, n_tiles, N, a.device)
    grid = (n_tiles * triton.cdiv(N, cfg["block_n"]),)
    _grouped_gemm_kernel[grid](
        a,
        gather_S if gather_S is not None else expert_M,
        *(inverse if inverse is not None else (expert_M, expert_M)),
        b_EKN,
        bias if bias is not None else b_EKN,
        pre if store_pre else out,
        out,
        expert_M,
        row_M,
        offsets_E1,
        n_tiles,
        N,
        K,
        E,
        a.stride(0),
        a.stride(1),
        *b_EKN.stride(),
        *(bias.stride() if bias is not None else (0, 0)),
        *(pre.stride() if store_pre else (0, 0)),
        *out.stride(),
        BLOCK_M=block_m,
        BLOCK_N=cfg["block_n"],
        BLOCK_K=cfg["block_k"],
        GROUP_M=cfg["group_m"],
        GATHER=gather_S is not None,
        ACT=code,
        GATED=gated,
        HAS_BIAS=bias is not None,
        STORE_PRE=store_pre,
        PRECISION=dot_precision(a.dtype),
        WRITE_INV=inverse is not None,
        INLINE_SCHEDULE=schedule is None,
        BLOCK_E=triton.next_power_of_2(max(E, 2)),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return pre, out


@torch.library.custom_op("moekit_triton::up", mutates_args=())
def up(
    x_TD: Tensor,
    token_S: Tensor,
    order_S: Tensor,
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
    """(h1 [S, H1] pre-activation, or [0, H1] at inference; a [S, H]; inv [S] int32, the
    sorted row of each kept flat slot, others unwritten); x gathered in-kernel."""
    inv_S = torch.empty(token_S.shape[0], dtype=torch.int32, device=x_TD.device)
    h1, a = grouped_gemm(
        x_TD,
        w1,
        (expert_M, row_M) if expert_M is not None else None,
        offsets_E1,
        token_S.shape[0],
        config_by_key(x_TD.device, cfg_key)["up"],
        block_m,
        gather_S=token_S,
        bias=b1,
        activation=activation,
        store_pre=store_pre,
        inverse=(order_S, inv_S),
    )
    return h1, a, inv_S


@up.register_fake
def _(x_TD, token_S, order_S, w1, b1, expert_M, row_M, offsets_E1, activation, block_m, key, pre):
    H1 = w1.shape[2]
    H = H1 // 2 if activation in GATED_ACTIVATIONS else H1
    S = token_S.shape[0]
    inv_S = token_S.new_empty(S, dtype=torch.int32)
    return x_TD.new_empty(S if pre else 0, H1), x_TD.new_empty(S, H), inv_S
