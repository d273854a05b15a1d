"""Gradient reduction when expert parallelism runs beside data parallelism.

Every rank sees different tokens. Replicated (non-expert) parameters need their gradients
averaged over all ranks, as in plain data parallelism. An expert's gradient already holds the
sum over its expert-parallel group (the all-to-all brought every rank's tokens to it); it
still needs the sum over the replicas holding the same experts (`dp_group`), and the same
1 / world_size scale, so that both kinds follow the gradient of the mean of the ranks' losses.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from moekit.parallel.expert_parallel import split_expert_params


def _grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Gradients, zeros where missing: every rank must reduce the same tensors."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def reduce_expert_gradients_(
    model: nn.Module, dp_group: ProcessGroup | None = None, world_size: int | None = None
) -> None:
    """Scale expert gradients by 1 / world_size, summed first over `dp_group` if given.

    Use it beside DDP / FSDP2 that handle the other parameters (with the expert ones
    excluded). world_size defaults to the default group's size.
    """
    expert, _ = split_expert_params(model)
    W = world_size or dist.get_world_size()
    for g in _grads(expert):
        if dp_group is not None:
            dist.all_reduce(g, group=dp_group)
        g.div_(W)


def reduce_gradients_(model: nn.Module, dp_group: ProcessGroup | None = None) -> None:
    """Plain data parallelism over the default group plus expert-gradient scaling.

    Replicated gradients are all-reduced over all ranks (one flat buffer) and averaged.
    """
    _, other = split_expert_params(model)
    grads = _grads(other)
    W = dist.get_world_size()
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(W)
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))
    reduce_expert_gradients_(model, dp_group, W)
