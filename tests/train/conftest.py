import pytest

import moekit
from moekit.model import ModelConfig
from moekit.tasks import TaskConfig
from moekit.train import RunConfig, TrainConfig


def tiny_run(out, **train) -> RunConfig:
    kw = dict(
        steps=12,
        batch_size=8,
        eval_interval=4,
        log_interval=3,
        warmup_steps=2,
        live="off",
        threads=1,
    )
    kw.update(train)
    return RunConfig(
        task=TaskConfig(name="signals", seq_len=16, val_sequences=16),
        model=ModelConfig(
            d_model=16,
            n_layers=2,
            n_heads=2,
            d_ff=32,
            max_seq_len=16,
            moe=moekit.MoEConfig(
                d_model=16,
                d_hidden=16,
                n_experts=4,
                k=2,
                router=moekit.RouterConfig(noise="gaussian", noise_std=0.5),  # uses the RNG
            ),
        ),
        train=TrainConfig(**kw),
        out=str(out),
    )


@pytest.fixture
def make_run():
    return tiny_run
