"""A transformer with expert-parallel layers trains like data parallelism over the ranks."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from tests.tiny import tiny_model

from moekit.model.transformer import Transformer
from moekit.parallel import gather_experts, parallelize_experts, split_expert_params
from moekit.parallel.data_parallel import (
    clip_grad_norm_,
    data_parallel,
    reduce_expert_gradients_,
    reduce_gradients_,
)


def _model() -> Transformer:
    """The shared tiny model with both layers MoE and tied embeddings."""
    return tiny_model(seed=4, n_layers=2, moe_every=1, tie_embeddings=True)


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randint(0, 11, (2, 6), generator=g), torch.randint(0, 11, (2, 6), generator=g)


def _oracle(rank: int, world: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The dense model on this rank's batch, and the mean over ranks of its gradients."""
    dense = _model()
    ref_out, ref_grads = None, {n: torch.zeros_like(p) for n, p in dense.named_parameters()}
    for r in range(world):
        dense.zero_grad()
        out = dense(*_batch(r))
        out.loss.backward()
        if r == rank:
            ref_out = out.out.detach()
        for n, p in dense.named_parameters():
            ref_grads[n] += p.grad / world
    return ref_out, ref_grads


def _check_grads(model: torch.nn.Module, ref_grads: dict[str, torch.Tensor], ep_group=None):
    expert, _ = split_expert_params(model)
    expert_ids = {id(p) for p in expert}
    assert len(expert) == 4  # w1, w2 of two layers
    for n, p in model.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grad = gather_experts(grad, ep_group) if id(p) in expert_ids else grad
        torch.testing.assert_close(grad, ref_grads[n], rtol=1e-5, atol=1e-8, msg=n)


def _mean_of_ranks(rank: int, world: int) -> None:
    ref_out, ref_grads = _oracle(rank, world)
    model = parallelize_experts(_model())
    out = model(*_batch(rank))
    torch.testing.assert_close(out.out, ref_out, rtol=1e-6, atol=1e-7)
    out.loss.backward()
    reduce_gradients_(model)
    _check_grads(model, ref_grads)
    # named_parameters lists tied weights once, as parameters() (and so the clipping) does
    ref_norm = torch.stack([g.square().sum() for g in ref_grads.values()]).sum().sqrt()
    norm = clip_grad_norm_(model, max_norm=0.5 * float(ref_norm))
    torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
    _check_grads(model, {n: g * 0.5 for n, g in ref_grads.items()})


def test_gradients_equal_data_parallel_mean_of_ranks(launch):
    launch(_mean_of_ranks, 2)


def _ddp(rank: int, world: int) -> None:
    """DDP (on its own group) for the replicated parameters, the experts scaled by hand."""
    ref_out, ref_grads = _oracle(rank, world)
    model = parallelize_experts(_model())
    wrapped = data_parallel(model, dist.new_group(list(range(world))))
    for micro in range(2):  # the first backward accumulates without an all-reduce
        with wrapped.no_sync() if micro == 0 else contextlib.nullcontext():
            out = wrapped(*_batch(rank))
            (out.loss / 2).backward()
    torch.testing.assert_close(out.out, ref_out, rtol=1e-6, atol=1e-7)
    reduce_expert_gradients_(model)
    _check_grads(model, ref_grads)


def test_ddp_for_the_other_parameters(launch):
    launch(_ddp, 2)


def _ep_inside_dp(rank: int, world: int) -> None:
    """4 ranks = 2 replicas x EP 2: EP groups {0, 1}, {2, 3}; replica groups {0, 2}, {1, 3}."""
    ep_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    ep_group, dp_group = ep_groups[rank // 2], dp_groups[rank % 2]
    _, ref_grads = _oracle(rank, world)
    model = parallelize_experts(_model(), ep_group)
    model(*_batch(rank)).loss.backward()
    reduce_gradients_(model, dp_group=dp_group)
    _check_grads(model, ref_grads, ep_group)


def test_expert_parallel_inside_data_parallel(launch):
    launch(_ep_inside_dp, 4)


def _fsdp2(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ref_out, ref_grads = _oracle(rank, world)
    model = parallelize_experts(_model())
    expert, _ = split_expert_params(model)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:  # FSDP2 shards everything but the expert-parallel weights
        fully_shard(block, mesh=mesh, ignored_params=set(expert))
    fully_shard(model, mesh=mesh, ignored_params=set(expert))
    out = model(*_batch(rank))
    torch.testing.assert_close(out.out, ref_out, rtol=1e-6, atol=1e-7)
    out.loss.backward()
    reduce_expert_gradients_(model)
    _check_grads(model, ref_grads)


def test_fsdp2_for_the_other_parameters(launch):
    launch(_fsdp2, 2)
