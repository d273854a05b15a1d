"""The tiny transformer the tests share: small enough for CPU, with every kind of block.

Three layers (dense, MoE with a shared expert, dense) and grouped-query attention; a test
overrides the fields its check needs. Import as ``from tests.tiny import tiny_model`` where
a fixture cannot reach (worker processes, module level), else use the root fixtures.
"""

from __future__ import annotations

import torch

from moekit import MoEConfig
from moekit.model import ModelConfig, Transformer

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
