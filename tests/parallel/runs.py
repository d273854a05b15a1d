"""A tiny expert-parallel training run for the trainer-level tests of this directory."""

from __future__ import annotations

from pathlib import Path

import moekit
from moekit.model import ModelConfig
from moekit.tasks import TaskConfig
from moekit.train import RunConfig, Trainer
from moekit.train.config import ParallelConfig, TrainConfig

E = 4  # experts per MoE layer: splits over 1, 2 and 4 ranks


def tiny_ep_run(out: Path, ep: int = 1, batch_size: int = 4, **train) -> RunConfig:
    """Six steps of the signals task, a checkpoint every three; batch_size rows per rank."""
    kw = dict(
        steps=6, batch_size=batch_size, eval_interval=6, log_interval=1, warmup_steps=2,
        ckpt_interval=3, keep_last=3, live="off", threads=1, prefetch=0,
    )  # fmt: skip
    kw.update(train)
    return RunConfig(
        task=TaskConfig(name="signals", seq_len=16, val_sequences=8),
        model=ModelConfig(
            d_model=16,
            n_layers=2,
            n_heads=2,
            d_ff=32,
            max_seq_len=16,
            moe=moekit.MoEConfig(
                d_model=16,
                d_hidden=16,
                n_experts=E,
                k=2,
                n_shared_experts=1,
                router=moekit.RouterConfig(noise="gaussian", noise_std=0.5),  # uses the RNG
            ),
        ),
        train=TrainConfig(**kw),
        parallel=ParallelConfig(ep=ep),
        out=str(out),
    )


def quiet_trainer(cfg: RunConfig) -> Trainer:
    """A Trainer that draws no plots (slow, and not what these tests check)."""
    trainer = Trainer(cfg)
    trainer.plot = lambda final: []
    return trainer
