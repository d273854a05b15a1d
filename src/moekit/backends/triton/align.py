"""Routing bookkeeping on the device: the tile schedule every grouped kernel walks.

Shape legend: S sorted token-slots, E experts, M tiles (each tile = up to BLOCK_M consecutive
sorted rows of one expert). The number of tiles is data dependent, so the grid is sized from
the static bound M <= min(S, cdiv(S, BLOCK_M) + E); tiles past the real count get expert E and
their programs return at once. Nothing here synchronises with the host. Each program of the
schedule kernel redoes the [E] prefix sum (`expert_tiles`, cheap) and resolves 64 tiles, so it
is one launch; on the decode path the GEMM programs skip it and call `find_tile` themselves.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moekit.backends.triton.ops import triton_op


def max_tiles(n_rows: int, n_experts: int, block_m: int) -> int:
    """Static upper bound on the number of non-empty BLOCK_M tiles over all experts."""
    return min(n_rows, triton.cdiv(n_rows, block_m) + n_experts)


@triton.jit
def expert_tiles(offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """The tile table over the experts [BLOCK_E]: (expert ids, end, base).

    end[e] is one past expert e's last tile (int32 max for padding experts, so they own no
    tile); the first sorted row of tile m of expert e is base[e] + m * BLOCK_M.
    """
    e = tl.arange(0, BLOCK_E)
    mask_e = e < E
    lo = tl.load(offsets_ptr + e, mask=mask_e, other=0).to(tl.int32)
    hi = tl.load(offsets_ptr + e + 1, mask=mask_e, other=0).to(tl.int32)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    end = tl.cumsum(tiles, 0)
    base = lo - (end - tiles) * BLOCK_M
    return e, tl.where(mask_e, end, 2147483647), base


@triton.jit
def find_tile(pid_m, offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, first sorted row) of tile pid_m: the schedule inline (expert E past the last)."""
    e_vec, end, base = expert_tiles(offsets_ptr, E, BLOCK_M, BLOCK_E)
    e = tl.sum((end <= pid_m).to(tl.int32), 0)
    return e, tl.sum(tl.where(e_vec == e, base, 0), 0) + pid_m * BLOCK_M


@triton.jit
def _schedule_kernel(
    # pointers
    offsets_ptr,  # [E + 1] int64 row offsets of each expert in the sorted order
    expert_M_ptr,  # [M] int32 out: expert of each tile, E when the tile is empty
    row_M_ptr,  # [M] int32 out: first sorted row of each tile
    # dims
    E,
    n_tiles,
    # meta-parameters
    BLOCK_M: tl.constexpr,  # rows per tile; the grouped kernels use the same value
    BLOCK_E: tl.constexpr,  # next power of two >= E, so one vector holds every expert
    BLOCK_T: tl.constexpr,  # tiles resolved per program (a [BLOCK_T, BLOCK_E] compare)
):
    e, end, base = expert_tiles(offsets_ptr, E, BLOCK_M, BLOCK_E)
    m = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    owner = tl.sum((end[None, :] <= m[:, None]).to(tl.int32), 1)  # E past the last tile
    pick = e[None, :] == owner[:, None]
    row = tl.sum(tl.where(pick, base[None, :], 0), 1) + m * BLOCK_M
    mask_m = m < n_tiles
    tl.store(expert_M_ptr + m, owner, mask=mask_m)
    tl.store(row_M_ptr + m, row, mask=mask_m)


def block_e(n_experts: int) -> int:
    """BLOCK_E of the tile table: the next power of two >= E (at least 2, for tl.arange)."""
    return triton.next_power_of_2(max(n_experts, 2))


@triton_op("moekit_triton::schedule")
def schedule(offsets_E1: Tensor, n_rows: int, block_m: int) -> tuple[Tensor, Tensor]:
    """(expert_M, row_M) int32 for the BLOCK_M tiling of the sorted rows; see module doc."""
    E = offsets_E1.shape[0] - 1
    n_tiles = max_tiles(n_rows, E, block_m)
    expert_M = torch.empty(n_tiles, dtype=torch.int32, device=offsets_E1.device)
    row_M = torch.empty(n_tiles, dtype=torch.int32, device=offsets_E1.device)
    if n_tiles:
        _schedule_kernel[(triton.cdiv(n_tiles, 64),)](
            offsets_E1,
            expert_M,
            row_M,
            E,
            n_tiles,
            BLOCK_M=block_m,
            BLOCK_E=block_e(E),
            BLOCK_T=64,
        )
    return expert_M, row_M


@schedule.register_fake
def _(offsets_E1: Tensor, n_rows: int, block_m: int) -> tuple[Tensor, Tensor]:
    n_tiles = max_tiles(n_rows, offsets_E1.shape[0] - 1, block_m)
    empty = offsets_E1.new_empty(n_tiles, dtype=torch.int32)
    return empty, torch.empty_like(empty)
