"""OpenAI-compatible POST /v1/chat/completions (n choices, logprobs, streaming).

Messages become one prompt through the tokenizer's chat template; byte-level models, which
have none, use `text.BYTE_CHAT_TEMPLATE`. Without max_tokens / max_completion_tokens a reply
may run to the server's max_new_tokens or the end of the context, whichever comes first (or
the tokenizer's end-of-sequence token). Tools, images and audio are refused with 400.
"""

from __future__ import annotations

import torch
from fastapi import APIRouter, Request

from moekit.model.codec import Codec
from moekit.serve.inputs import (
    ApiError,
    check_max_new,
    check_prompt_length,
    check_total_length,
    room_left,
    text_ids,
)
from moekit.serve.openai_compat import head, refuse_unsupported, stream_reply, submit
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
from moekit.serve.sequence import Logprobs
from moekit.serve.service import Delta
from moekit.serve.sse import sse_response
from moekit.serve.state import Security, ServerState, State

router = APIRouter()


def _refuse_unsupported(body: ChatRequest) -> None:
    """400 naming the first field, or part of a message, this server does not implement."""
    refuse_unsupported(body)
    for i, message in enumerate(body.messages):
        problem = message.unreadable()
        if problem is not None:
            field, why = f"messages.{i}.{problem[0]}", problem[1]
            raise ApiError(400, f"{field}: {why}", field)


def _prompt(body: ChatRequest, s: ServerState) -> torch.Tensor:
    if s.codec is None:
        raise ApiError(422, "messages: this model reads no text (no tokenizer)", "messages")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = s.codec.chat_prompt(messages)
    except ValueError as err:  # a tokenizer without a chat template
        raise ApiError(422, f"messages: {err}", "messages") from None
    ids = text_ids(text, "messages", s.codec, s.model, chat=True)
    check_prompt_length(len(ids), "messages", s.cfg, s.engine.context_length)
    return torch.tensor(ids, dtype=torch.long)


def _max_tokens(body: ChatRequest, s: ServerState, prompt: int) -> int:
    """The reply's length limit; without one, what the context leaves (at most max_new_tokens)."""
    context = s.engine.context_length
    for field in ("max_completion_tokens", "max_tokens"):
        value = getattr(body, field)
        if value is not None:
            check_max_new(value, field, s.model, s.cfg)
            check_total_length(prompt, value, field, context)
            return value
    value = room_left(prompt, s.cfg, context)
    check_total_length(prompt, value, "max_completion_tokens", context)
    return value


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
async def chat(body: ChatRequest, request: Request, s: State, security: Security):
    codec: Codec = s.codec  # type: ignore[assignment]
    _refuse_unsupported(body)
    prompt = _prompt(body, s)
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(422, "top_logprobs: needs logprobs=true", "top_logprobs")
    max_tokens = _max_tokens(body, s, len(prompt))
    handle = submit(s, body, [prompt], max_tokens, top_logprobs, request)
    top = head(body, "chatcmpl", s)
    if body.stream:

        def chunk(d: Delta) -> ChatChunkChoice | None:
            lp = _logprobs([(d.token, d.logprobs)], codec) if d.logprobs is not None else None
            if d.finish_reason is not None:
                delta = ChatDelta(content=d.text or None)
            elif d.text or lp is not None:
                delta = ChatDelta(content=d.text)
            else:
                return None
            return ChatChunkChoice(
                index=d.index, delta=delta, logprobs=lp, finish_reason=d.finish_reason
            )

        roles = [
            ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
            for i in range(len(handle.choices))
        ]
        chunks = stream_reply(handle, top, ChatChunk, body, chunk, security, body.messages, roles)
        return sse_response(chunks)
    choices = await handle.result()
    out = [
        ChatChoice(
            index=i,
            message=ChatReply(content=c.text),
            logprobs=_logprobs(c.logprobs, codec) if body.logprobs else None,
            finish_reason=c.reason(),
        )
        for i, c in enumerate(choices)
    ]
    log_exchange(security, top["id"], body.messages, [c.text for c in choices])
    return ChatCompletion(**top, choices=out, usage=handle.usage())
