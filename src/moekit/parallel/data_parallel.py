"""Gradient reduction when expert parallelism runs beside data parallelism.

Every rank sees different tokens. Replicated (non-expert) parameters need their gradients
averaged over all ranks, as in plain data parallelism. An expert's gradient already holds the
sum over its expert-parallel group (the all-to-all brought every rank's tokens to it); it
still needs the sum over the replicas holding the same experts (`dp_group`), and the same
1 / world_size scale, so that both kinds follow the gradient of the mean of the ranks' losses.

`data_parallel` hands the replicated parameters to torch's DDP (bucketed all-reduce overlapped
with backward); `reduce_expert_gradients_` then scales the experts'. `reduce_gradients_` does
both after backward by hand, for a loop that cannot wrap its model.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup
from torch.nn.parallel import DistributedDataParallel

from moekit.parallel.expert_parallel import split_expert_params


def _grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Gradients, zeros where missing: every rank must reduce the same tensors."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def data_parallel(model: nn.Module, group: ProcessGroup | None = None) -> DistributedDataParallel:
    """DDP over `group` for every parameter except the expert-parallel ones.

    Run the forward through the returned wrapper. Buffers stay rank-local (as without DDP);
    parameters no rank used get no gradient, as in one process. Give DDP its own group when
    the experts' all-to-all uses the default one, so their collectives never interleave.
    """
    expert, _ = split_expert_params(model)
    expert_ids = {id(p) for p in expert}
    ignored = [name for name, p in model.named_parameters() if id(p) in expert_ids]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    # torch >= 2.13 names the buffer switch forward_sync_buffers; older ones broadcast_buffers
    params = inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync = (
        "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    )
    return DistributedDataParallel(
        model, process_group=group, find_unused_parameters=True, **{no_buffer_sync: False}
    )


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


def clip_grad_norm_(
    model: nn.Module, max_norm: float, ep_group: ProcessGroup | None = None
) -> torch.Tensor:
    """Clip by the norm of the whole model's gradient, the same factor on every rank.

    A local `torch.nn.utils.clip_grad_norm_` would see only this rank's experts and clip the
    replicated parameters differently per rank. Call after the gradient reduction; plain
    tensors only (FSDP2's sharded gradients need its own clipping). Returns the total norm.
    """
    expert, other = split_expert_params(model)
    device = next(model.parameters()).device

    def square_sum(params: list[nn.Parameter]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=device)
        for p in params:
            if p.grad is not None:
                total = total + p.grad.float().square().sum()
        return total

    expert_sq = square_sum(expert)
    dist.all_reduce(expert_sq, group=ep_group)  # each expert lives on one rank of the group
    norm = (square_sum(other) + expert_sq).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in expert + other:
        if p.grad is not None:
            p.grad.mul_(scale.to(p.grad.dtype))
    return norm
