"""What users would otherwise run, for benchmarks to compare against.

naive_loop: the per-expert loop with torch.where + index_add_ that Hugging Face's Mixtral
block uses. dense_equivalent: two plain GEMMs doing the same FLOPs, no routing at all.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.types import activate


def naive_loop(
    x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, w1: Tensor, w2: Tensor, activation: str
) -> Tensor:
    """For each expert: find its tokens, run its MLP, scale, index_add into y."""
    y_TD = torch.zeros_like(x_TD)
    for e in range(w1.shape[0]):
        token_N, slot_N = torch.where(experts_TK == e)
        if token_N.numel() == 0:
            continue
        out_ND = activate(x_TD[token_N] @ w1[e], activation) @ w2[e]
        y_TD.index_add_(0, token_N, out_ND * weights_TK[token_N, slot_N, None].to(x_TD.dtype))
    return y_TD


def dense_equivalent(x_SD: Tensor, w1_DH: Tensor, w2_HD: Tensor, activation: str) -> Tensor:
    """Two GEMMs over all S = T * k token-slots: the routed FLOPs with no routing cost."""
    return activate(x_SD @ w1_DH, activation) @ w2_HD
