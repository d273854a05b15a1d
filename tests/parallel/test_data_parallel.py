"""A transformer with expert-parallel layers trains like data parallelism over the ranks."""

from __future__ import annotations

import torch

from moekit import MoEConfig
from moekit.model.config import ModelConfig
from moekit.model.transformer import Transformer
from moekit.parallel import gather_experts, parallelize_experts, split_expert_params
from moekit.parallel.data_parallel import reduce_gradients_


def _model() -> Transformer:
    torch.manual_seed(4)
    cfg = ModelConfig(vocab_size=11, d_model=16, n_layers=2, n_heads=2, tie_embeddings=True)
    cfg.moe = MoEConfig(d_model=16, d_hidden=8, n_experts=4, k=2, backend="torch")
    return Transformer(cfg)


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randint(0, 11, (2, 6), generator=g), torch.randint(0, 11, (2, 6), generator=g)


def _mean_of_ranks(rank: int, world: int) -> None:
    dense = _model()
    ref_out, ref_grads = None, {n: torch.zeros_like(p) for n, p in dense.named_parameters()}
    for r in range(world):  # the oracle: mean over ranks of the dense model's gradients
        dense.zero_grad()
        out = dense(*_batch(r))
        out.loss.backward()
        if r == rank:
            ref_out = out.out.detach()
        for n, p in dense.named_parameters():
            ref_grads[n] += p.grad / world
    model = parallelize_experts(_model())
    out = model(*_batch(rank))
    torch.testing.assert_close(out.out, ref_out, rtol=1e-6, atol=1e-7)
    out.loss.backward()
    reduce_gradients_(model)
    expert, _ = split_expert_params(model)
    expert_ids = {id(p) for p in expert}
    assert len(expert) == 4  # w1, w2 of two layers
    for n, p in model.named_parameters():
        grad = gather_experts(p.grad) if id(p) in expert_ids else p.grad
        torch.testing.assert_close(grad, ref_grads[n], rtol=1e-5, atol=1e-8, msg=n)


def test_gradients_equal_data_parallel_mean_of_ranks(launch):
    launch(_mean_of_ranks, 2)
