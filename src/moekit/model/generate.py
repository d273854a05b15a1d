"""Incremental decoding with a KV cache: token sampling and continuous rollout.

The prompt is run once to fill the cache; each later step feeds one position. When the
context would pass `max_seq_len`, the cache is rebuilt from the last half window, so
positions stay within what the model was trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from moekit.model.cache import KVCache
from moekit.model.config import ModelConfig
from moekit.model.sampling import sample_next


class Decodable(Protocol):
    """What decoding needs of a `Transformer`, named here because the transformer calls in."""

    cfg: ModelConfig
    training: bool

    @property
    def is_lm(self) -> bool: ...

    def new_cache(self) -> KVCache: ...

    def __call__(self, x: Tensor, cache: KVCache | None = None) -> Any: ...

    def eval(self) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...


def _check(model: Decodable, prompt: Tensor, temperature: float) -> None:
    if model.is_lm and prompt.dim() != 2:
        raise ValueError(f"token prompt must be [B, S], got shape {tuple(prompt.shape)}")
    if not model.is_lm and (prompt.dim() != 3 or model.cfg.d_out != model.cfg.d_in):
        raise ValueError("continuous rollout needs a [B, S, d_in] prompt and d_out == d_in")
    if prompt.shape[1] < 1:
        raise ValueError("prompt must hold at least one position")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")


@torch.no_grad()
def generate(
    model: Decodable,
    prompt: Tensor,
    max_new: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    on_step: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """Continue prompt by max_new positions; see `Transformer.generate`. `on_step` gets each
    new position ([B, 1] or [B, 1, d_out]) as it comes, for callers that stream."""
    _check(model, prompt, temperature)
    was_training = model.training
    model.eval()
    window = model.cfg.max_seq_len
    seq = prompt
    cache = model.new_cache() if use_cache else None
    feed = seq[:, -window:]
    for _ in range(max_new):
        out = model(feed, cache=cache).out[:, -1]  # [B, V] or [B, d_out]
        if model.is_lm:
            nxt = sample_next(out, temperature, top_k, top_p, generator)[:, None]  # [B, 1]
        else:
            nxt = out[:, None, :].to(seq.dtype)  # [B, 1, d_out]
        seq = torch.cat([seq, nxt], dim=1)
        if on_step is not None:
            on_step(nxt)
        if cache is None:
            feed = seq[:, -window:]
        elif len(cache) + 1 > window:  # slide: recompute on the last half window
            cache = model.new_cache()
            feed = seq[:, -(window // 2 + 1) :]
        else:
            feed = nxt
    model.train(was_training)
    return seq
