"""Following a request's events: submission errors as HTTP answers, disconnects as cancels."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from torch import Tensor

from moekit.serve.engine import Engine, EngineStopped, QueueFull
from moekit.serve.inputs import ApiError
from moekit.serve.sequence import Event, SamplingParams, Sequence

POLL_S = 0.25  # how often a waiting handler checks whether its client is still there
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def submit(
    engine: Engine,
    x: Tensor,
    params: SamplingParams,
    request_id: str | None = None,
    use_cache: bool = True,
) -> Sequence:
    """Queue a request, or answer 429 (queue full) / 503 (shutting down) with Retry-After."""
    return submit_n(engine, x, params, 1, request_id, use_cache)[0]


def submit_n(
    engine: Engine,
    x: Tensor,
    params: SamplingParams,
    n: int,
    request_id: str | None = None,
    use_cache: bool = True,
) -> list[Sequence]:
    """n continuations of x (`Engine.submit_n`), with the errors of `submit`."""
    retry = {"Retry-After": str(engine.cfg.retry_after_s)}
    try:
        return engine.submit_n(x, params, n, request_id, use_cache)
    except QueueFull as err:
        raise ApiError(429, f"server busy: {err}", None, "rate_limit_error", retry) from err
    except EngineStopped as err:
        raise ApiError(503, str(err), None, "server_shutting_down", retry) from err


async def follow(engine: Engine, seq: Sequence, request: Request) -> AsyncIterator[Event]:
    """Yield seq's events until 'done'; cancel it if the client goes away or we are closed."""
    try:
        while True:
            try:  # an event already queued needs no timer (a slow reader catching up)
                event = seq.events.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    event = await asyncio.wait_for(seq.events.get(), POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
            yield event
            if event.kind == "done":
                return
    finally:
        engine.cancel(seq)  # no-op once finished


def sse(data: dict[str, Any] | str, event: str | None = None) -> str:
    """One Server-Sent Event."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n"
