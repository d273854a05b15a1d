"""The tiny transformer and the tiny training run the tests share: small enough for CPU.

The model: three layers (dense, MoE with a shared expert, dense) and grouped-query attention;
a test overrides the fields its check needs. The run: a few steps of the signals task on a
smaller two-layer all-MoE model. Import as ``from tests.tiny import tiny_model`` where a
fixture cannot reach (worker processes, module level), else use the root fixtures.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moekit import MoEConfig, RouterConfig
from moekit.model import ModelConfig, Transformer
from moekit.tasks import TaskConfig
from moekit.train import RunConfig, TrainConfig
from moekit.train.config import ParallelConfig

TINY = {
    "vocab_size": 37,
    "d_model": 32,
    "n_layers": 3,
    "n_heads": 4,
    "n_kv_heads": 2,
    "d_ff": 48,
    "max_seq_len": 32,
    "moe_every": 2,
}
TINY_MOE = {"d_model": 32, "d_hidden": 24, "n_experts": 4, "k": 2, "n_shared_experts": 1}


def tiny_config(**overrides) -> ModelConfig:
    """`TINY` with `overrides` (any ModelConfig field, `moe` as a whole MoEConfig)."""
    return ModelConfig(**{**TINY, "moe": MoEConfig(**TINY_MOE), **overrides})


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """A freshly initialised tiny model: the same seed and overrides give the same weights."""
    torch.manual_seed(seed)
    return Transformer(tiny_config(**overrides))


RUN_MODEL = {"d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32, "max_seq_len": 16}
RUN_MOE = {"d_model": 16, "d_hidden": 16, "n_experts": 4, "k": 2}


def tiny_run(
    out: str | Path, *, ep: int = 1, n_shared_experts: int = 0, val_sequences: int = 16, **train
) -> RunConfig:
    """The signals task on the `RUN_MODEL` transformer, quiet and single-threaded; `train`
    sets any TrainConfig field (each test directory brings its own step schedule)."""
    router = RouterConfig(noise="gaussian", noise_std=0.5)  # noisy: the run uses the RNG
    moe = MoEConfig(**RUN_MOE, n_shared_experts=n_shared_experts, router=router)
    return RunConfig(
        task=TaskConfig(name="signals", seq_len=16, val_sequences=val_sequences),
        model=ModelConfig(**RUN_MODEL, moe=moe),
        train=TrainConfig(**{"warmup_steps": 2, "live": "off", "threads": 1, **train}),
        parallel=ParallelConfig(ep=ep),
        out=str(out),
    )
