import pytest

import moekit
from moekit.model import ModelConfig


def tiny(**kw) -> ModelConfig:
    base = dict(
        vocab_size=37,
        d_model=32,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        d_ff=48,
        max_seq_len=32,
        moe=moekit.MoEConfig(d_model=32, d_hidden=24, n_experts=4, k=2, n_shared_experts=1),
        moe_every=2,
    )
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def tiny_cfg():
    return tiny
