"""A tiny expert-parallel training run for the trainer-level tests of this directory."""

from __future__ import annotations

from pathlib import Path

from tests.tiny import RUN_MOE, tiny_run

from moekit.train import RunConfig, Trainer

E = RUN_MOE["n_experts"]  # experts per MoE layer (4): splits over 1, 2 and 4 ranks


def tiny_ep_run(out: Path, ep: int = 1, batch_size: int = 4, **train) -> RunConfig:
    """Six steps of the signals task, a checkpoint every three; batch_size rows per rank."""
    schedule = dict(
        steps=6, batch_size=batch_size, eval_interval=6, log_interval=1, ckpt_interval=3,
        keep_last=3, prefetch=0,
    )  # fmt: skip
    return tiny_run(out, ep=ep, n_shared_experts=1, val_sequences=8, **{**schedule, **train})


def quiet_trainer(cfg: RunConfig) -> Trainer:
    """A Trainer that draws no plots (slow, and not what these tests check)."""
    trainer = Trainer(cfg)
    trainer.plot = lambda final: []
    return trainer
