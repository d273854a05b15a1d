"""`Sequence`: one request's state inside the engine, and the events it sends back."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

FINISH_REASONS = ("length", "stop", "cancelled", "timeout", "error", "shutdown")


@dataclass
class SamplingParams:
    """How a request continues its prompt (validated by the HTTP schemas)."""

    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # None = a fresh random seed
    logprobs: int | None = None  # best alternatives reported with each token; None = none
    stop_token_ids: tuple[int, ...] = ()  # ends the sequence ('stop'), not emitted: e.g. EOS
    frequency_penalty: float = 0.0  # OpenAI's: logit -= count of the token among the outputs x this
    presence_penalty: float = 0.0  # OpenAI's: logit -= this once the token is among the outputs
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    @classmethod
    def from_request(
        cls,
        body: Any,
        max_new_tokens: int,
        logprobs: int | None,
        logit_bias: tuple[tuple[int, float], ...] = (),
    ) -> SamplingParams:
        """The sampling of any request body (native or OpenAI): top_p 1 and top_k None or <= 0
        are off; penalties are 0 where the body has none."""
        top_p = body.top_p if body.top_p is not None and body.top_p < 1.0 else None
        top_k = getattr(body, "top_k", None)
        return cls(
            max_new_tokens,
            body.temperature,
            top_k if top_k is not None and top_k > 0 else None,
            top_p,
            body.seed,
            logprobs,
            frequency_penalty=getattr(body, "frequency_penalty", 0.0),
            presence_penalty=getattr(body, "presence_penalty", 0.0),
            logit_bias=logit_bias,
        )

    @property
    def adjusts_logits(self) -> bool:
        """Penalties or biases change this request's logits before sampling."""
        return bool(self.frequency_penalty or self.presence_penalty or self.logit_bias)


@dataclass
class Logprobs:
    """The model's log-probability of an emitted token and of the best `top` tokens."""

    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class Event:
    """kind 'token' (value: token id or output vector) or 'done' (value: finish reason)."""

    kind: str
    value: Any
    logprobs: Logprobs | None = None


@dataclass(eq=False)
class Sequence:
    """A prompt being continued: tokens [P] int64 or vectors [P, d_in]; outputs arrive as Events."""

    id: str
    prompt: Tensor
    params: SamplingParams
    deadline: float  # time.monotonic() after which the request stops
    seed: int = 0  # the sampling seed actually used
    use_cache: bool = True  # reuse and offer cached prompt prefixes
    after: Sequence | None = None  # admitted once this one has its first output (n > 1)
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    outputs: list[Any] = field(default_factory=list)  # token ids, or vectors [d_out]
    logprobs_out: list[Logprobs] = field(default_factory=list)  # one per output, when asked
    feed: Tensor | None = None  # the prompt's last window: what prefill feeds
    fed: int = 0  # positions of `feed` already in the KV cache
    hashes: list[bytes] = field(default_factory=list)  # block hashes of `feed` (prefix reuse)
    row: int | None = None  # KV row while admitted
    prefix_hit: int = 0  # prompt positions reused from the prefix cache
    cancelled: bool = False
    finish_reason: str | None = None
    t_submit: float = field(default_factory=time.monotonic)
    t_first: float | None = None
    t_last: float | None = None
    t_done: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def logprobs(self) -> int | None:
        return self.params.logprobs

    def ready(self) -> bool:
        """May be admitted: it waits for no other sequence's first output."""
        return self.after is None or self.after.t_first is not None or self.after.done

    def history(self) -> Tensor:
        """Prompt then outputs: tokens [P + n] or vectors [P + n, d] (outputs fed back)."""
        if not self.outputs:
            return self.prompt
        if self.prompt.is_floating_point():
            return torch.cat([self.prompt, torch.stack(self.outputs).to(self.prompt.dtype)])
        return torch.cat([self.prompt, torch.tensor(self.outputs, dtype=self.prompt.dtype)])

    def emit(self, value: Any, logprobs: Logprobs | None = None) -> float | None:
        """Send one output; returns the time since the previous one (None for the first)."""
        now = time.monotonic()
        gap = None if self.t_last is None else now - self.t_last
        if self.t_first is None:
            self.t_first = now
        self.t_last = now
        self.outputs.append(value)
        if logprobs is not None:
            self.logprobs_out.append(logprobs)
        self.events.put_nowait(Event("token", value, logprobs))
        return gap

    def finish(self, reason: str) -> None:
        if self.done:
            return
        self.finish_reason = reason
        self.t_done = time.monotonic()
        self.events.put_nowait(Event("done", reason))
