"""Bodies of the OpenAI-compatible endpoints: the subset of OpenAI's API this server implements.

Requests refuse unknown fields, as the native ones do; `request_id` and `use_cache` are this
server's own additions. Log-probabilities are the model's (before temperature, top-k, top-p).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from moekit.serve.schemas import Strict, Usage, bounded, request_id_field, use_cache_field


class StreamOptions(Strict):
    include_usage: bool = False


class Sampled(Strict):
    """Fields every OpenAI-compatible request shares."""

    model: str
    temperature: float = bounded("openai_temperature", 1.0)
    top_p: float = bounded("top_p", 1.0)
    n: int = bounded("n", 1, description="continuations of each prompt")
    seed: int | None = bounded("seed", None, description="choice i uses seed + i")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="up to 4 strings ending the text")
    user: str | None = None
    request_id: str | None = request_id_field()
    use_cache: bool = use_cache_field()


# completions ------------------------------------------------------------------------------
class CompletionRequest(Sampled):
    """POST /v1/completions: text (or token ids) in, text out."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, texts, token ids, or lists of token ids (one choice set each)"
    )
    max_tokens: int = bounded("max_new_tokens", 16)
    logprobs: int | None = bounded("logprobs", None, description="best tokens reported")
    echo: Literal[False] = False


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ResponseHead(BaseModel):
    """The fields OpenAI's response objects open with; `object` names the kind."""

    id: str
    object: str
    created: int
    model: str


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(ResponseHead):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


# chat ---------------------------------------------------------------------------------------
class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(Sampled):
    """POST /v1/chat/completions: messages in (through the chat template), a message out."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = bounded("max_new_tokens", None)
    max_completion_tokens: int | None = bounded("max_new_tokens", None)
    logprobs: bool = False
    top_logprobs: int | None = bounded("logprobs", None)


class TopChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopChatLogprob):
    top_logprobs: list[TopChatLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatReply(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatReply
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(ResponseHead):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatChunk(ResponseHead):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
