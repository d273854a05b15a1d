"""The choices of one OpenAI-style request: submitting them, following them, turning them to text.

A request holds one or several prompts, each continued `n` times; every continuation is one
engine `Sequence` and one choice (index = prompt * n + i). Their events are merged into one
stream; each choice decodes its tokens incrementally, stops at the first stop string (its
sequence is cancelled then) and keeps its tokens' log-probabilities.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from torch import Tensor

from moekit.model.codec import Codec
from moekit.serve.engine import Engine
from moekit.serve.inputs import ApiError, StopMatcher
from moekit.serve.schemas import Usage
from moekit.serve.sequence import Event, Logprobs, SamplingParams, Sequence
from moekit.serve.stream import follow, submit_n

MAX_STOPS = 4


def stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise ApiError(422, f"stop: at most {MAX_STOPS} stop strings", "stop")
    return stops


def submit_all(
    engine: Engine,
    prompts: list[Tensor],
    params: SamplingParams,
    n: int,
    request_id: str | None,
    use_cache: bool,
) -> list[Sequence]:
    """n sequences per prompt, in choice order; all or none are queued."""
    seqs: list[Sequence] = []
    try:
        for j, prompt in enumerate(prompts):
            rid = request_id if request_id is None or len(prompts) == 1 else f"{request_id}-{j}"
            seqs += submit_n(engine, prompt, params, n, rid, use_cache)
    except ApiError:
        for seq in seqs:
            engine.cancel(seq)
        raise
    return seqs


async def follow_all(
    engine: Engine, seqs: list[Sequence], request: Request
) -> AsyncIterator[tuple[int, Event]]:
    """(choice index, event) of every sequence as they come, until each is done.

    A client that goes away cancels them all; a choice whose stream ends early reads 'done'.
    """
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(i: int, seq: Sequence) -> None:
        last = None
        async with aclosing(follow(engine, seq, request)) as events:
            async for event in events:
                last = event
                queue.put_nowait((i, event))
        if last is None or last.kind != "done":  # the client left
            queue.put_nowait((i, Event("done", "cancelled")))

    tasks = [asyncio.create_task(pump(i, seq)) for i, seq in enumerate(seqs)]
    left = len(seqs)
    try:
        while left:
            i, event = await queue.get()
            left -= event.kind == "done"
            yield i, event
    finally:
        for task in tasks:
            task.cancel()
        for seq in seqs:
            engine.cancel(seq)


async def collect(
    engine: Engine, seqs: list[Sequence], choices: list[ChoiceText], request: Request
) -> None:
    """Feeds each sequence's tokens to its choice until all are done (non-streaming replies);
    a choice that hits a stop string cancels its sequence."""
    async for i, event in follow_all(engine, seqs, request):
        if event.kind == "token":
            choices[i].feed(event)
            if choices[i].stop.stopped:
                engine.cancel(seqs[i])


class ChoiceText:
    """One choice's text: decoded incrementally, cut at the first stop string; its logprobs."""

    def __init__(self, codec: Codec, stops: list[str]) -> None:
        self.codec = codec
        self.decoder = codec.decoder()
        self.stop = StopMatcher(stops)
        self.text = ""
        self.logprobs: list[tuple[int, Logprobs]] = []  # (token id, its logprobs)

    def feed(self, event: Event) -> str:
        """A token event -> the text that may be sent now."""
        if self.stop.stopped:
            return ""
        if event.logprobs is not None:
            self.logprobs.append((event.value, event.logprobs))
        piece = self.stop.feed(self.decoder.feed(event.value))
        self.text += piece
        return piece

    def close(self) -> str:
        """The text held back at the end (a partial character, a possible stop string)."""
        tail = self.stop.feed(self.decoder.flush(), final=True)
        self.text += tail
        return tail

    def reason(self, seq: Sequence) -> str:
        """OpenAI's 'stop' / 'length'; ours otherwise ('timeout', 'cancelled', 'error')."""
        return "stop" if self.stop.stopped else (seq.finish_reason or "length")


def usage(prompts: list[Tensor], seqs: list[Sequence]) -> Usage:
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(seq.outputs) for seq in seqs)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )
