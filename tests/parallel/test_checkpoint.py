"""Checkpoints of expert-parallel layers and models: dense format, any world size on load."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from tests.tiny import tiny_model

from moekit import MoE, MoEConfig
from moekit.model.transformer import Transformer
from moekit.parallel import ExpertParallelMoE, parallelize_experts
from moekit.parallel.checkpoint import (
    full_state_dict,
    load_layer,
    load_safetensors,
    save_layer,
    save_safetensors,
    to_dense_model,
)

CFG = MoEConfig(d_model=8, d_hidden=6, n_experts=4, k=2, n_shared_experts=1, backend="torch")


def _dense_layer() -> MoE:
    torch.manual_seed(2)
    return MoE(CFG)


def _save(rank: int, world: int, directory: str) -> None:
    save_layer(ExpertParallelMoE.from_dense(_dense_layer()), directory)


def _load(rank: int, world: int, directory: str) -> None:
    layer = load_layer(directory)
    assert layer.dispatcher.ep_size == world and layer.dispatcher.n_local == 4 // world
    dense = _dense_layer()
    lo = rank * layer.dispatcher.n_local
    assert torch.equal(layer.experts.w1, dense.experts.w1[lo : lo + layer.dispatcher.n_local])
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(rank))
    y, y_ref = layer(x)[0], dense(x)[0]
    assert (y - y_ref).abs().max() <= 1e-6 * y_ref.abs().max()


def test_layer_saved_on_2_ranks_loads_on_4_and_as_a_plain_moe(launch, tmp_path):
    directory = str(tmp_path / "layer")
    launch(_save, 2, directory)
    launch(_load, 4, directory)
    plain = MoE(CFG)
    plain.load_state_dict(load_file(f"{directory}/model.safetensors"))
    for (name, a), b in zip(
        plain.state_dict().items(), _dense_layer().state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def _tiny_model() -> Transformer:
    """The shared tiny model with both layers MoE and tied embeddings."""
    return tiny_model(seed=4, n_layers=2, moe_every=1, tie_embeddings=True)


def _model_round_trip(rank: int, world: int, path: str) -> None:
    dense = _tiny_model()
    model = parallelize_experts(_tiny_model())
    assert sum(isinstance(m, ExpertParallelMoE) for m in model.modules()) == 2
    full = full_state_dict(model)
    assert full.keys() == dense.state_dict().keys()
    for key, value in dense.state_dict().items():
        assert torch.equal(full[key], value), key
    back = to_dense_model(model)
    assert not any(isinstance(m, ExpertParallelMoE) for m in back.modules())
    assert back.head.weight is back.embed.weight, "tied weights stay tied"
    save_safetensors(model, path)
    fresh = parallelize_experts(_tiny_model())
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    load_safetensors(fresh, path)
    for (name, a), b in zip(fresh.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_model_with_expert_parallel_layers_saves_and_loads(launch, tmp_path):
    launch(_model_round_trip, 2, str(tmp_path / "model.safetensors"))
