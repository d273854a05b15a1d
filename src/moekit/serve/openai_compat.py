"""OpenAI-compatible GET /v1/models and POST /v1/completions (n choices, logprobs, streaming).

Text goes through the model's codec (its tokenizer, or UTF-8 bytes for byte-level models);
token-id prompts work for any token model. Generation goes through the app's `Service`; this
module and `openai_chat` only translate OpenAI's schemas, and share the streaming here.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

import torch
from fastapi import APIRouter, Request
from pydantic import BaseModel
from torch import Tensor

from moekit.model.codec import Codec
from moekit.serve.inputs import (
    ApiError,
    check_ids,
    check_max_new,
    check_prompt_length,
    check_total_length,
    text_ids,
)
from moekit.serve.openai_schemas import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    OpenAIBody,
    ResponseHead,
)
from moekit.serve.security import SecurityConfig, log_exchange
from moekit.serve.sequence import Logprobs, SamplingParams
from moekit.serve.service import Delta, Handle
from moekit.serve.sse import sse, sse_response
from moekit.serve.state import Security, ServerState, State

router = APIRouter()


@router.get("/v1/models", summary="The served model, as OpenAI lists models")
async def models(s: State) -> dict:
    entry = {
        "id": s.name,
        "object": "model",
        "created": int(s.started),
        "owned_by": "moekit",
        "max_model_len": s.engine.context_length,
    }
    return {"object": "list", "data": [entry]}


def refuse_unsupported(body: OpenAIBody) -> None:
    """400 naming the first field set to a value this server does not implement."""
    for name, (accepted, what) in body.unsupported.items():
        value = getattr(body, name)
        if not accepted(value):
            msg = f"{name}: {value!r} is not supported by this server (accepted: {what})"
            raise ApiError(400, msg, name)


def logit_bias(body: OpenAIBody, s: ServerState) -> tuple[tuple[int, float], ...]:
    """The body's logit_bias as (token id, bias) pairs; 422 for a key that is not a token id."""
    vocab = s.model.cfg.vocab_size or 0
    out = []
    for key, bias in (body.logit_bias or {}).items():
        token = int(key) if key.isascii() and key.isdigit() else -1
        if not 0 <= token < vocab:
            msg = f"logit_bias: key {key!r} is not a token id in [0, vocab_size={vocab})"
            raise ApiError(422, msg, "logit_bias")
        out.append((token, bias))
    return tuple(out)


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
        check_prompt_length(len(ids), "prompt", s.cfg, s.engine.context_length)
        check_total_length(len(ids), body.max_tokens, "max_tokens", s.engine.context_length)
        out.append(torch.tensor(check_ids(ids, "prompt", s.model), dtype=torch.long))
    return out


def submit(
    s: ServerState,
    body: OpenAIBody,
    prompts: list[Tensor],
    max_tokens: int,
    logprobs: int | None,
    request: Request,
) -> Handle:
    """An OpenAI request's n choices of each prompt, queued on the app's service."""
    params = SamplingParams.from_request(body, max_tokens, logprobs, logit_bias(body, s))
    return s.service.submit(
        prompts,
        params,
        n=body.n,
        stops=body.stop,
        request_id=body.request_id,
        use_cache=body.use_cache,
        disconnected=request.is_disconnected,
    )


def head(body: OpenAIBody, prefix: str, s: ServerState) -> dict:
    """The id, time and model every object of one answer carries: the model is the served
    name when one was given (`served_model_name`), else the name the request used."""
    rid = body.request_id or f"{prefix}-{uuid.uuid4().hex}"
    return {"id": rid, "created": int(time.time()), "model": s.served_name or body.model}


async def stream_reply(
    handle: Handle,
    top: dict,
    reply: type[ResponseHead],
    body: OpenAIBody,
    chunk: Callable[[Delta], BaseModel | None],
    security: SecurityConfig,
    prompt: object,
    opening: list[BaseModel] | None = None,
) -> AsyncIterator[str]:
    """OpenAI's SSE: `opening` choices, a chunk per delta that carries something (`chunk`
    None: skip it), the usage when stream_options asks, then [DONE]."""
    for choice in opening or []:
        yield sse(reply(**top, choices=[choice]).model_dump(exclude={"usage"}))
    async with aclosing(handle.stream()) as deltas:
        async for d in deltas:
            choice = chunk(d)
            if choice is not None:
                yield sse(reply(**top, choices=[choice]).model_dump(exclude={"usage"}))
    log_exchange(security, top["id"], prompt, [c.text for c in handle.choices])
    if body.stream_options is not None and body.stream_options.include_usage:
        yield sse(reply(**top, choices=[], usage=handle.usage()).model_dump())
    yield sse("[DONE]")


@router.post(
    "/v1/completions",
    summary="OpenAI-compatible text completion (JSON, or SSE with stream=true)",
    response_model=Completion,
)
async def completions(body: CompletionRequest, request: Request, s: State, security: Security):
    codec: Codec = s.codec  # type: ignore[assignment]
    refuse_unsupported(body)
    check_max_new(body.max_tokens, "max_tokens", s.model, s.cfg)
    prompts = _prompts(body, s)
    handle = submit(s, body, prompts, body.max_tokens, body.logprobs, request)
    top = head(body, "cmpl", s)
    if body.stream:
        offsets = [0] * len(handle.choices)  # text sent so far by each choice

        def chunk(d: Delta) -> CompletionChoice | None:
            lp = None
            if d.logprobs is not None:  # this token's logprobs go with whatever text it released
                lp = _logprobs([(d.token, d.logprobs)], codec, offsets[d.index])
            offsets[d.index] += len(d.text)  # type: ignore[arg-type]
            if not d.text and lp is None and d.finish_reason is None:
                return None
            return CompletionChoice(
                text=d.text, index=d.index, logprobs=lp, finish_reason=d.finish_reason
            )

        return sse_response(
            stream_reply(handle, top, Completion, body, chunk, security, body.prompt)
        )
    choices = await handle.result()
    out = [
        CompletionChoice(
            text=c.text,
            index=i,
            logprobs=_logprobs(c.logprobs, codec) if body.logprobs is not None else None,
            finish_reason=c.reason(),
        )
        for i, c in enumerate(choices)
    ]
    log_exchange(security, top["id"], body.prompt, [c.text for c in out])
    return Completion(**top, choices=out, usage=handle.usage())


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
