"""The small-batch (decode) schedule: spread each active expert's weights over many CTAs.

With few rows per expert the grouped kernels are bound by reading the weights of the experts
hit, once. One BLOCK_M tile then covers all of an expert's rows (the shape class picks
BLOCK_M from S / E), and the N dimension of the weights is split finely enough that at least
two CTAs per SM stream disjoint column blocks, so the whole chip pulls on HBM at once.
The grid stays sized from the static tile bound, so this adds no host sync. In this class the
forward GEMM programs also find their own tile (`up.find_tile`): one launch fewer.
"""

from __future__ import annotations

from functools import cache

import torch
import triton

MIN_BLOCK_N = 32  # narrower column blocks make the dot too small for the tensor cores
CTAS_PER_SM = 2


@cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def spread(cfg: dict, n_tiles: int, n_cols: int, device: torch.device) -> dict:
    """cfg with block_n halved until n_tiles * cdiv(n_cols, block_n) fills the chip."""
    if device.type != "cuda":
        return cfg
    want = CTAS_PER_SM * _sm_count(device.index if device.index is not None else 0)
    block_n = cfg["block_n"]
    while block_n > MIN_BLOCK_N and n_tiles * triton.cdiv(n_cols, block_n) < want:
        block_n //= 2
    return cfg if block_n == cfg["block_n"] else dict(cfg, block_n=block_n)
