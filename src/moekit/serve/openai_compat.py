"""OpenAI-compatible GET /v1/models and POST /v1/completions (n choices, logprobs, streaming).

Text goes through the model's codec (its tokenizer, or UTF-8 bytes for byte-level models);
token-id prompts work for any token model. Chat lives in `openai_chat`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import torch
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from torch import Tensor

from moekit.model.codec import Codec
from moekit.serve.choices import ChoiceText, collect, follow_all, stop_strings, submit_all, usage
from moekit.serve.inputs import (
    ApiError,
    check_ids,
    check_max_new,
    check_prompt_length,
    text_ids,
)
from moekit.serve.openai_schemas import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
)
from moekit.serve.security import log_exchange
from moekit.serve.sequence import Logprobs, SamplingParams, Sequence
from moekit.serve.state import ServerState
from moekit.serve.stream import SSE_HEADERS, sse

router = APIRouter()


def state(request: Request) -> ServerState:
    return request.app.state.serve


@router.get("/v1/models", summary="The served model, as OpenAI lists models")
async def models(request: Request) -> dict:
    s = state(request)
    entry = {"id": s.name, "object": "model", "created": int(s.started), "owned_by": "moekit"}
    return {"object": "list", "data": [entry]}


def _prompts(body: CompletionRequest, s: ServerState) -> list[Tensor]:
    """The request's prompts as token tensors [P], each checked."""
    if not s.model.is_lm or s.codec is None:
        raise ApiError(422, "prompt: /v1/completions needs a token model that reads text", "prompt")
    p = body.prompt
    if isinstance(p, str):
        texts: list[str | list[int]] = [p]
    elif p and all(isinstance(t, int) for t in p):
        texts = [p]  # type: ignore[list-item]
    else:
        texts = list(p)  # type: ignore[arg-type]
    if not texts:
        raise ApiError(422, "prompt: send at least one prompt", "prompt")
    out = []
    for text in texts:
        ids = text_ids(text, "prompt", s.codec, s.model) if isinstance(text, str) else text
        check_prompt_length(len(ids), "prompt", s.cfg)
        out.append(torch.tensor(check_ids(ids, "prompt", s.model), dtype=torch.long))
    return out


def sampling(body, max_tokens: int, logprobs: int | None, codec: Codec) -> SamplingParams:
    """SamplingParams of an OpenAI request: top_p 1 is off, the tokenizer's EOS stops."""
    top_p = body.top_p if body.top_p < 1.0 else None
    return SamplingParams(
        max_tokens, body.temperature, None, top_p, body.seed, logprobs, codec.eos_ids
    )


@router.post(
    "/v1/completions",
    summary="OpenAI-compatible text completion (JSON, or SSE with stream=true)",
    response_model=Completion,
)
async def completions(body: CompletionRequest, request: Request):
    s = state(request)
    prompts = _prompts(body, s)
    check_max_new(body.max_tokens, "max_tokens", s.model, s.cfg)
    stops = stop_strings(body.stop)
    params = sampling(body, body.max_tokens, body.logprobs, s.codec)  # type: ignore[arg-type]
    seqs = submit_all(s.engine, prompts, params, body.n, body.request_id, body.use_cache)
    cid = body.request_id or f"cmpl-{uuid.uuid4().hex}"
    choices = [ChoiceText(s.codec, stops) for _ in seqs]  # type: ignore[arg-type]
    head = {"id": cid, "created": int(time.time()), "model": body.model}
    if body.stream:
        include = body.stream_options is not None and body.stream_options.include_usage
        chunks = _chunks(s, seqs, choices, request, head, include, prompts, body.prompt)
        return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
    await collect(s.engine, seqs, choices, request)
    out = []
    for i, (choice, seq) in enumerate(zip(choices, seqs, strict=True)):
        choice.close()
        lp = _logprobs(choice.logprobs, s.codec) if body.logprobs is not None else None  # type: ignore[arg-type]
        out.append(
            CompletionChoice(
                text=choice.text, index=i, logprobs=lp, finish_reason=choice.reason(seq)
            )
        )
    log_exchange(request.app.state.security, cid, body.prompt, [c.text for c in out])
    return Completion(**head, choices=out, usage=usage(prompts, seqs))


def _logprobs(
    items: list[tuple[int, Logprobs]], codec: Codec, offset: int = 0
) -> CompletionLogprobs:
    """OpenAI's legacy logprobs: token texts, their logprobs, the best others, text offsets."""
    tokens, offsets = [], []
    for token, _ in items:
        offsets.append(offset)
        tokens.append(codec.token_text(token))
        offset += len(tokens[-1])
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[lp.logprob for _, lp in items],
        top_logprobs=[{codec.token_text(t): v for t, v in lp.top} for _, lp in items],
        text_offset=offsets,
    )


async def _chunks(
    s: ServerState,
    seqs: list[Sequence],
    choices: list[ChoiceText],
    request: Request,
    head: dict,
    include_usage: bool,
    prompts: list[Tensor],
    prompt_text: object,
) -> AsyncIterator[str]:
    codec: Codec = s.codec  # type: ignore[assignment]
    offsets = [0] * len(seqs)

    def chunk(i: int, text: str, reason: str | None, lp: CompletionLogprobs | None) -> str:
        choice = CompletionChoice(text=text, index=i, logprobs=lp, finish_reason=reason)
        return sse(Completion(**head, choices=[choice]).model_dump(exclude={"usage"}))

    async for i, event in follow_all(s.engine, seqs, request):
        c = choices[i]
        if event.kind == "done":
            tail = c.close()
            yield chunk(i, tail, c.reason(seqs[i]), None)
            continue
        seen = len(c.logprobs)
        piece = c.feed(event)
        if c.stop.stopped:
            s.engine.cancel(seqs[i])
        lp = None
        if len(c.logprobs) > seen:  # this token's logprobs go with whatever text it released
            lp = _logprobs(c.logprobs[seen:], codec, offsets[i])
        offsets[i] += len(piece)
        if piece or lp is not None:
            yield chunk(i, piece, None, lp)
    log_exchange(request.app.state.security, head["id"], prompt_text, [c.text for c in choices])
    if include_usage:
        yield sse(Completion(**head, choices=[], usage=usage(prompts, seqs)).model_dump())
    yield sse("[DONE]")
