"""OpenAI-compatible POST /v1/chat/completions (n choices, logprobs, streaming).

Messages become one prompt through the tokenizer's chat template; byte-level models, which
have none, use `text.BYTE_CHAT_TEMPLATE`. Without max_tokens / max_completion_tokens a reply
may run to the server's max_new_tokens (or the tokenizer's end-of-sequence token).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import torch
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from moekit.model.codec import Codec
from moekit.serve.choices import ChoiceText, collect, follow_all, stop_strings, submit_all, usage
from moekit.serve.inputs import ApiError, check_max_new, check_prompt_length, text_ids
from moekit.serve.openai_compat import sampling
from moekit.serve.openai_schemas import (
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatCompletion,
    ChatDelta,
    ChatLogprobs,
    ChatReply,
    ChatRequest,
    ChatTokenLogprob,
    TopChatLogprob,
)
from moekit.serve.security import log_exchange
from moekit.serve.sequence import Logprobs, Sequence
from moekit.serve.state import ServerState
from moekit.serve.stream import SSE_HEADERS, sse

router = APIRouter()


def _prompt(body: ChatRequest, s: ServerState) -> torch.Tensor:
    if s.codec is None:
        raise ApiError(422, "messages: this model reads no text (no tokenizer)", "messages")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = s.codec.chat_prompt(messages)
    except ValueError as err:  # a tokenizer without a chat template
        raise ApiError(422, f"messages: {err}", "messages") from None
    ids = text_ids(text, "messages", s.codec, s.model, chat=True)
    check_prompt_length(len(ids), "messages", s.cfg)
    return torch.tensor(ids, dtype=torch.long)


def _max_tokens(body: ChatRequest, s: ServerState) -> int:
    if body.max_completion_tokens is not None:
        check_max_new(body.max_completion_tokens, "max_completion_tokens", s.model, s.cfg)
        return body.max_completion_tokens
    if body.max_tokens is not None:
        check_max_new(body.max_tokens, "max_tokens", s.model, s.cfg)
        return body.max_tokens
    return s.cfg.max_new_tokens


def _token(token: int, logprob: float, codec: Codec) -> TopChatLogprob:
    raw = list(codec.token_bytes(token))
    return TopChatLogprob(token=codec.token_text(token), logprob=logprob, bytes=raw)


def _logprobs(items: list[tuple[int, Logprobs]], codec: Codec) -> ChatLogprobs:
    content = []
    for token, lp in items:
        top = [_token(t, v, codec) for t, v in lp.top]
        content.append(
            ChatTokenLogprob(**_token(token, lp.logprob, codec).model_dump(), top_logprobs=top)
        )
    return ChatLogprobs(content=content)


@router.post(
    "/v1/chat/completions",
    summary="OpenAI-compatible chat completion (JSON, or SSE with stream=true)",
    response_model=ChatCompletion,
)
async def chat(body: ChatRequest, request: Request):
    s: ServerState = request.app.state.serve
    prompt = _prompt(body, s)
    top = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(422, "top_logprobs: needs logprobs=true", "top_logprobs")
    params = sampling(body, _max_tokens(body, s), top, s.codec)  # type: ignore[arg-type]
    stops = stop_strings(body.stop)
    seqs = submit_all(s.engine, [prompt], params, body.n, body.request_id, body.use_cache)
    choices = [ChoiceText(s.codec, stops) for _ in seqs]  # type: ignore[arg-type]
    head = {"id": body.request_id or f"chatcmpl-{uuid.uuid4().hex}"}
    head |= {"created": int(time.time()), "model": body.model}
    if body.stream:
        include = body.stream_options is not None and body.stream_options.include_usage
        chunks = _chunks(s, seqs, choices, request, head, include, prompt, body)
        return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
    await collect(s.engine, seqs, choices, request)
    out = []
    for i, (choice, seq) in enumerate(zip(choices, seqs, strict=True)):
        choice.close()
        lp = _logprobs(choice.logprobs, s.codec) if body.logprobs else None  # type: ignore[arg-type]
        reply = ChatReply(content=choice.text)
        out.append(
            ChatChoice(index=i, message=reply, logprobs=lp, finish_reason=choice.reason(seq))
        )
    log_exchange(request.app.state.security, head["id"], body.messages, [c.text for c in choices])
    return ChatCompletion(**head, choices=out, usage=usage([prompt], seqs))


async def _chunks(
    s: ServerState,
    seqs: list[Sequence],
    choices: list[ChoiceText],
    request: Request,
    head: dict,
    include_usage: bool,
    prompt: torch.Tensor,
    body: ChatRequest,
) -> AsyncIterator[str]:
    codec: Codec = s.codec  # type: ignore[assignment]

    def chunk(i: int, delta: ChatDelta, reason: str | None = None, lp=None) -> str:
        choice = ChatChunkChoice(index=i, delta=delta, logprobs=lp, finish_reason=reason)
        return sse(ChatChunk(**head, choices=[choice]).model_dump(exclude={"usage"}))

    for i in range(len(seqs)):
        yield chunk(i, ChatDelta(role="assistant", content=""))
    async for i, event in follow_all(s.engine, seqs, request):
        c = choices[i]
        if event.kind == "done":
            tail = c.close()
            yield chunk(i, ChatDelta(content=tail or None), c.reason(seqs[i]))
            continue
        seen = len(c.logprobs)
        piece = c.feed(event)
        if c.stop.stopped:
            s.engine.cancel(seqs[i])
        lp = _logprobs(c.logprobs[seen:], codec) if len(c.logprobs) > seen else None
        if piece or lp is not None:
            yield chunk(i, ChatDelta(content=piece), None, lp)
    log_exchange(request.app.state.security, head["id"], body.messages, [c.text for c in choices])
    if include_usage:
        yield sse(ChatChunk(**head, choices=[], usage=usage([prompt], seqs)).model_dump())
    yield sse("[DONE]")
