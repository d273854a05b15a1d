"""OpenAI-compatible POST /v1/completions for byte-level token models (n = 1, no logprobs)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from moekit.serve.inputs import ApiError, StopMatcher, TextDecoder, check_max_new, model_input
from moekit.serve.schemas import (
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelInput,
    Usage,
)
from moekit.serve.security import log_exchange
from moekit.serve.sequence import SamplingParams, Sequence
from moekit.serve.state import ServerState
from moekit.serve.stream import SSE_HEADERS, follow, sse, submit

router = APIRouter()


def _prompt(body: CompletionRequest) -> str:
    if isinstance(body.prompt, str):
        return body.prompt
    if len(body.prompt) != 1:
        raise ApiError(422, "prompt: send one text (a list must hold exactly one)", "prompt")
    return body.prompt[0]


def _stops(body: CompletionRequest) -> list[str]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4:
        raise ApiError(422, "stop: at most 4 stop strings", "stop")
    return stops


def _usage(seq: Sequence) -> Usage:
    n = len(seq.outputs)
    return Usage(
        prompt_tokens=len(seq.prompt), completion_tokens=n, total_tokens=len(seq.prompt) + n
    )


@router.post(
    "/v1/completions",
    summary="OpenAI-compatible text completion (JSON, or SSE with stream=true)",
    response_model=Completion,
)
async def completions(body: CompletionRequest, request: Request):
    s: ServerState = request.app.state.serve
    if not s.byte_level:
        raise ApiError(422, "prompt: /v1/completions needs a byte-level token model", "prompt")
    prompt = _prompt(body)
    x = model_input(ModelInput(prompt=prompt), s.model, s.cfg)
    check_max_new(body.max_tokens, "max_tokens", s.model, s.cfg)
    stop = StopMatcher(_stops(body))
    top_p = body.top_p if body.top_p < 1.0 else None
    params = SamplingParams(body.max_tokens, body.temperature, None, top_p, body.seed)
    seq = submit(s.engine, x, params)
    created = int(time.time())
    cid = f"cmpl-{seq.id}"
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = _chunks(s, seq, request, stop, cid, created, body.model, usage, prompt)
        return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
    decoder, text = TextDecoder(), ""
    async with aclosing(follow(s.engine, seq, request)) as events:
        async for event in events:
            if event.kind == "token":
                text += stop.feed(decoder.feed(event.value))
                if stop.stopped:
                    break
    text += stop.feed(decoder.flush(), final=True)
    reason = "stop" if stop.stopped else _reason(seq)
    log_exchange(request.app.state.security, cid, prompt, text)
    choice = CompletionChoice(text=text, finish_reason=reason)
    return Completion(
        id=cid, created=created, model=body.model, choices=[choice], usage=_usage(seq)
    )


def _reason(seq: Sequence) -> str:
    """OpenAI reasons: 'length' when max_tokens was reached; ours otherwise (e.g. 'timeout')."""
    return seq.finish_reason or "length"


async def _chunks(
    s: ServerState,
    seq: Sequence,
    request: Request,
    stop: StopMatcher,
    cid: str,
    created: int,
    model: str,
    include_usage: bool,
    prompt: str,
) -> AsyncIterator[str]:
    def chunk(text: str, reason: str | None) -> str:
        choice = CompletionChoice(text=text, finish_reason=reason)
        body = Completion(id=cid, created=created, model=model, choices=[choice])
        return sse(body.model_dump(exclude={"usage"}))

    decoder, text = TextDecoder(), ""
    async with aclosing(follow(s.engine, seq, request)) as events:
        async for event in events:
            if event.kind == "done":
                break
            piece = stop.feed(decoder.feed(event.value))
            text += piece
            if piece:
                yield chunk(piece, None)
            if stop.stopped:
                break
    tail = stop.feed(decoder.flush(), final=True)
    log_exchange(request.app.state.security, cid, prompt, text + tail)
    yield chunk(tail, "stop" if stop.stopped else _reason(seq))
    if include_usage:
        body = Completion(id=cid, created=created, model=model, choices=[], usage=_usage(seq))
        yield sse(body.model_dump())
    yield sse("[DONE]")
