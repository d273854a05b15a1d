"""The LM loss over chunks of tokens, so the [tokens, vocab] logits never live whole.

With a large vocabulary the head's logits, their float32 copy for the cross-entropy and
their gradient are the largest tensors of a training step (Qwen3's 151,936 entries per
token: ~2.4 MB per token in float32 with the gradient), and activation checkpointing of the
blocks does not reach them. Each chunk's logits are made, reduced to a loss sum and freed;
the backward recomputes them one chunk at a time (non-reentrant `torch.utils.checkpoint`).
The loss is the mean over targets that are not `ignore_index`, as `F.cross_entropy`'s.

Shape legend: N tokens, D model dim, V vocabulary, C tokens per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # F.cross_entropy's default


def _chunk_loss_sum(h_CD: Tensor, targets_C: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    logits_CV = F.linear(h_CD, weight, bias)
    return F.cross_entropy(logits_CV.float(), targets_C, reduction="sum")


def chunked_cross_entropy(
    h_ND: Tensor, weight: Tensor, bias: Tensor | None, targets_N: Tensor, chunk: int
) -> Tensor:
    """mean cross-entropy of (h_ND @ weight.T + bias) against targets_N, C = chunk at a time."""
    total = h_ND.new_zeros((), dtype=torch.float32)
    for start in range(0, h_ND.shape[0], chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(
            _chunk_loss_sum, h_ND[part], targets_N[part], weight, bias, use_reentrant=False
        )
    return total / (targets_N != IGNORE_INDEX).sum().clamp_min(1)
