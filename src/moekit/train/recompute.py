"""Activation checkpointing: keep less for the backward pass and recompute it there.

`train.activation_checkpointing`:
- ``experts``: each MoE layer's stage 3 (gather, expert MLPs, combine) keeps only its inputs;
  the expert hidden activations [S, H1], the largest tensors of an MoE block, are recomputed.
- ``blocks``: each transformer block keeps only its input; attention, routing and experts are
  recomputed.

Non-reentrant `torch.utils.checkpoint` with the RNG state preserved, so router noise and dropout
draw the same numbers twice and the gradients equal those without checkpointing bit for bit on
CPU. Buffers a forward updates (the sigmoid router's load counts, co-activation counts) are put
back to their pre-forward values for the recompute and restored after it, so nothing is counted
twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moekit.layer import MoE
from moekit.train.config import CHECKPOINTING as MODES


def checkpoint_activations(model: nn.Module, mode: str) -> int:
    """Recompute `model`'s experts or blocks in the backward pass; returns how many it wraps.

    Parameter and buffer names are unchanged (the wrapped modules' `forward` is replaced on
    the instance), so checkpoints load either way.
    """
    if mode not in MODES:
        raise ValueError(f"train.activation_checkpointing={mode!r} is not one of {MODES}")
    if mode == "none":
        return 0
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError("train.activation_checkpointing needs a model with `blocks`")
    wrapped = 0
    for block in blocks:
        if mode == "blocks":
            block.forward = partial(_recompute, block.forward, _mutable_buffers(block))
            wrapped += 1
        elif isinstance(getattr(block, "ffn", None), MoE):
            moe = block.ffn
            moe.compute = partial(_recompute, moe.compute, [])  # stage 3 updates no buffer
            wrapped += 1
    return wrapped


def _mutable_buffers(module: nn.Module) -> list[Tensor]:
    """Every buffer a forward may update: saved ones and running counts (the sigmoid router's
    load since the last optimiser step), so the recompute starts where the forward did."""
    return list(module.buffers())


def _recompute(fn: Callable[..., Any], buffers: list[Tensor], *args: Any, **kwargs: Any) -> Any:
    if not buffers:
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    snapshot = _BufferSnapshot(buffers)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=snapshot.contexts, **kwargs)


class _BufferSnapshot:
    """The forward records the buffers it starts from; the recompute runs from them."""

    def __init__(self, buffers: list[Tensor]) -> None:
        self.buffers = buffers
        self.before: list[Tensor] = []

    def contexts(self) -> tuple[contextlib.AbstractContextManager, ...]:
        return self._forward(), self._recompute()

    @contextlib.contextmanager
    def _forward(self) -> Iterator[None]:
        self.before = [b.detach().clone() for b in self.buffers]
        yield

    @contextlib.contextmanager
    def _recompute(self) -> Iterator[None]:
        after = [b.detach().clone() for b in self.buffers]
        for b, old in zip(self.buffers, self.before, strict=True):
            b.data.copy_(old)
        try:
            yield
        finally:
            for b, new in zip(self.buffers, after, strict=True):
                b.data.copy_(new)
