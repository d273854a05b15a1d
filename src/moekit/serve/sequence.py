"""`Sequence`: one request's state inside the engine, and the events it sends back."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

FINISH_REASONS = ("length", "cancelled", "timeout", "error", "shutdown")


@dataclass
class SamplingParams:
    """How a request continues its prompt (validated by the HTTP schemas)."""

    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # None = a fresh random seed


@dataclass
class Event:
    """kind 'token' (value: token id or output vector) or 'done' (value: finish reason)."""

    kind: str
    value: Any


@dataclass(eq=False)
class Sequence:
    """A prompt being continued: tokens [P] int64 or vectors [P, d_in]; outputs arrive as Events."""

    id: str
    prompt: Tensor
    params: SamplingParams
    deadline: float  # time.monotonic() after which the request stops
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    generator: torch.Generator = field(default_factory=torch.Generator)
    outputs: list[Any] = field(default_factory=list)  # token ids, or vectors [d_out]
    history: Tensor | None = None  # prompt + fed outputs, for re-prefill when the window slides
    pending: Tensor | None = None  # the last output, fed at the next decode step
    row: int | None = None  # SlotCache row while decoding
    prefix_hit: int = 0  # prompt positions reused from the prefix cache
    cancelled: bool = False
    finish_reason: str | None = None
    t_submit: float = field(default_factory=time.monotonic)
    t_first: float | None = None
    t_done: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def emit(self, value: Any) -> None:
        if self.t_first is None:
            self.t_first = time.monotonic()
        self.outputs.append(value)
        self.events.put_nowait(Event("token", value))

    def finish(self, reason: str) -> None:
        if self.done:
            return
        self.finish_reason = reason
        self.t_done = time.monotonic()
        self.events.put_nowait(Event("done", reason))
