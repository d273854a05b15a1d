"""OpenAI-compatible POST /v1/chat/completions (n choices, logprobs, streaming).

Messages become one prompt through the tokenizer's chat template; byte-level models, which
have none, use `text.BYTE_CHAT_TEMPLATE`. Without max_tokens / max_completion_tokens a reply
may run to the server's max_new_tokens (or the tokenizer's end-of-sequence token).
"""

from __future__ import annotations

import torch
from fastapi import APIRouter, Request

from moekit.model.codec import Codec
from moekit.serve.inputs import ApiError, check_max_new, check_prompt_length, text_ids
from moekit.serve.openai_compat import head, stream_reply, submit
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
async def chat(body: ChatRequest, request: Request, s: State, security: Security):
    codec: Codec = s.codec  # type: ignore[assignment]
    prompt = _prompt(body, s)
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(422, "top_logprobs: needs logprobs=true", "top_logprobs")
    handle = submit(s, body, [prompt], _max_tokens(body, s), top_logprobs, request)
    top = head(body, "chatcmpl")
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
