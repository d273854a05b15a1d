"""`Service`: the one request pipeline every endpoint adapts its schema to.

`submit` queues n continuations of each prompt (choice j * n + i is continuation i of prompt
j; each is one engine `Sequence`). Its `Handle` merges their events into one stream of
`Delta`s: each choice decodes its tokens incrementally through the codec, ends at the first
stop string (its sequence is cancelled then) and keeps its tokens' log-probabilities; the
codec's end-of-sequence ids stop every sequence. A client that goes away cancels them all.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from moekit.model.codec import Codec
from moekit.serve.engine import Engine, EngineStopped, QueueFull
from moekit.serve.inputs import ApiError, StopMatcher
from moekit.serve.schemas import Usage
from moekit.serve.sequence import Event, Logprobs, SamplingParams, Sequence

POLL_S = 0.25  # how often a waiting stream checks whether its client is still there
MAX_STOPS = 4  # stop strings one request may give
Disconnected = Callable[[], Awaitable[bool]]  # True once the client has gone away


@dataclass
class Delta:
    """What one event of choice `index` releases: a token and its text, or the choice's end."""

    index: int
    token: Any = None  # token id or output vector [d_out]; None on the choice's last delta
    text: str | None = None  # text safe to send now; None when the model reads no text
    logprobs: Logprobs | None = None  # this token's, when the request asked for them
    finish_reason: str | None = None  # set on the last delta only


class Choice:
    """One continuation: its sequence, its text (cut at the first stop string), its logprobs."""

    def __init__(self, seq: Sequence, codec: Codec | None, stops: list[str]) -> None:
        self.seq = seq
        self.decoder = codec.decoder() if codec is not None else None
        self.stop = StopMatcher(stops)
        self.text: str | None = "" if codec is not None else None
        self.logprobs: list[tuple[int, Logprobs]] = []  # (token id, its logprobs)

    @property
    def stopped(self) -> bool:
        """A stop string ended the text."""
        return self.stop.stopped

    def feed(self, event: Event) -> str | None:
        """A token event -> the text that may be sent now (None without a codec)."""
        if event.logprobs is not None:
            self.logprobs.append((event.value, event.logprobs))
        if self.decoder is None:
            return None
        piece = self.stop.feed(self.decoder.feed(event.value))
        self.text += piece  # type: ignore[operator]
        return piece

    def close(self) -> str | None:
        """The text held back at the end (a partial character, a possible stop string)."""
        if self.decoder is None:
            return None
        tail = self.stop.feed(self.decoder.flush(), final=True)
        self.text += tail  # type: ignore[operator]
        return tail

    def reason(self, unfinished: str = "length") -> str:
        """'stop' for a stop string or id, else the engine's reason; `unfinished` if it has none."""
        return "stop" if self.stopped else (self.seq.finish_reason or unfinished)


class Handle:
    """The choices of one submitted request; read them as a `stream()` or as a `result()`."""

    def __init__(
        self,
        engine: Engine,
        prompts: list[Tensor],
        choices: list[Choice],
        disconnected: Disconnected | None,
    ) -> None:
        self.engine, self.prompts, self.choices = engine, prompts, choices
        self.disconnected = disconnected

    @property
    def seqs(self) -> list[Sequence]:
        return [c.seq for c in self.choices]

    async def stream(self) -> AsyncIterator[Delta]:
        """Every choice's deltas as they come, until each has sent its last (finish_reason)."""
        async with aclosing(_merge(self.engine, self.seqs, self.disconnected)) as events:
            async for i, event in events:
                c = self.choices[i]
                if event.kind == "done":  # its value: the reason, or 'cancelled' if the client left
                    yield Delta(i, None, c.close(), None, c.reason(event.value))
                elif not c.stopped:  # tokens drawn after a stop string are not the choice's
                    text = c.feed(event)
                    if c.stopped:
                        self.engine.cancel(c.seq)
                    yield Delta(i, event.value, text, event.logprobs)

    async def result(self) -> list[Choice]:
        """Wait for every choice to finish; their text, logprobs and reasons."""
        async with aclosing(self.stream()) as deltas:
            async for _ in deltas:
                pass
        return self.choices

    def usage(self) -> Usage:
        """Prompt positions (each prompt once, whatever n) and every choice's outputs."""
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.seq.outputs) for c in self.choices)
        return Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )


class Service:
    """Queues requests on one engine and turns their outputs into text through one codec."""

    def __init__(self, engine: Engine, codec: Codec | None) -> None:
        self.engine, self.codec = engine, codec

    def submit(
        self,
        prompts: list[Tensor],
        params: SamplingParams,
        n: int = 1,
        stops: str | list[str] | None = None,
        request_id: str | None = None,
        use_cache: bool = True,
        disconnected: Disconnected | None = None,
    ) -> Handle:
        """Queue n continuations of each prompt (tokens [P] or vectors [P, d_in]), all or none.

        Answers 422 (more than MAX_STOPS stop strings), 429 (queue full) or 503 (shutting down).
        """
        stop_list = _stop_strings(stops)
        eos = self.codec.eos_ids if self.codec is not None else ()
        params = replace(
            params, stop_token_ids=tuple(dict.fromkeys((*params.stop_token_ids, *eos)))
        )
        seqs: list[Sequence] = []
        try:
            for j, prompt in enumerate(prompts):
                rid = request_id if request_id is None or len(prompts) == 1 else f"{request_id}-{j}"
                seqs += self.engine.submit_n(prompt, params, n, rid, use_cache)
        except (QueueFull, EngineStopped) as err:
            for seq in seqs:
                self.engine.cancel(seq)
            raise _refusal(err, self.engine.cfg.retry_after_s) from err
        choices = [Choice(seq, self.codec, stop_list) for seq in seqs]
        return Handle(self.engine, prompts, choices, disconnected)


def _stop_strings(stops: str | list[str] | None) -> list[str]:
    out = [stops] if isinstance(stops, str) else list(stops or [])
    if len(out) > MAX_STOPS:
        raise ApiError(422, f"stop: at most {MAX_STOPS} stop strings", "stop")
    return out


def _refusal(err: QueueFull | EngineStopped, retry_after_s: int) -> ApiError:
    """429 for a full queue, 503 while shutting down; both say when to retry."""
    retry = {"Retry-After": str(retry_after_s)}
    if isinstance(err, QueueFull):
        return ApiError(429, f"server busy: {err}", None, "rate_limit_error", retry)
    return ApiError(503, str(err), None, "server_shutting_down", retry)


async def _follow(
    engine: Engine, seq: Sequence, disconnected: Disconnected | None
) -> AsyncIterator[Event]:
    """seq's events until 'done'; cancels it if the client goes away or the reader stops."""
    try:
        while True:
            try:  # an event already queued needs no timer (a slow reader catching up)
                event = seq.events.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    event = await asyncio.wait_for(seq.events.get(), POLL_S)
                except TimeoutError:
                    if disconnected is not None and await disconnected():
                        return
                    continue
            yield event
            if event.kind == "done":
                return
    finally:
        engine.cancel(seq)  # no-op once finished


async def _events(
    engine: Engine, seq: Sequence, disconnected: Disconnected | None
) -> AsyncIterator[Event]:
    """seq's events, ending with 'done' always: 'cancelled' when the client left first."""
    last = None
    async with aclosing(_follow(engine, seq, disconnected)) as events:
        async for event in events:
            last = event
            yield event
    if last is None or last.kind != "done":
        yield Event("done", "cancelled")


async def _merge(
    engine: Engine, seqs: list[Sequence], disconnected: Disconnected | None
) -> AsyncIterator[tuple[int, Event]]:
    """(choice index, event) of every sequence as they come, until each is done.

    One sequence is read in place; several are pumped into one queue by a task each. A client
    that goes away cancels them all.
    """
    if len(seqs) == 1:
        async with aclosing(_events(engine, seqs[0], disconnected)) as events:
            async for event in events:
                yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(i: int, seq: Sequence) -> None:
        async with aclosing(_events(engine, seq, disconnected)) as events:
            async for event in events:
                queue.put_nowait((i, event))

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
