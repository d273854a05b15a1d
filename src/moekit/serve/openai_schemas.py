"""Bodies of the OpenAI-compatible endpoints: every field of OpenAI's completions and chat
requests is accepted.

Fields this server implements are honoured; the others are accepted at their default (or a
value meaning the same here) and a request giving anything else is refused with 400 naming
the field (`OpenAIBody.unsupported`). A null top-level field means its default. Unknown
fields are refused (422), as the native bodies do; `request_id`, `use_cache` and `top_k` are
this server's additions. Log-probabilities are the model's (before penalties, biases,
temperature, top-k, top-p).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moekit.serve.schemas import Strict, Usage, bounded, request_id_field, use_cache_field

MAX_BIAS = 100.0  # |logit_bias| values, as OpenAI bounds them
MAX_PENALTY = 2.0  # |frequency_penalty|, |presence_penalty|


def _null(v: Any) -> bool:
    return v is None


def _null_or(*allowed: Any) -> Callable[[Any], bool]:
    return lambda v: v is None or v in allowed


def _empty(v: Any) -> bool:
    return not v


# field -> (accepted value?, what is accepted): any other value is refused with 400
Accepts = dict[str, tuple[Callable[[Any], bool], str]]


class StreamOptions(Strict):
    include_usage: bool | None = False  # a last chunk with the usage, when true
    include_obfuscation: bool | None = None  # accepted: no obfuscation field is ever added


class OpenAIBody(Strict):
    """Fields every OpenAI-compatible request shares; `unsupported` lists accepted-only ones."""

    unsupported: ClassVar[Accepts] = {}

    model: str
    temperature: float = bounded("openai_temperature", 1.0)
    top_p: float = bounded("top_p", 1.0)
    top_k: int | None = Field(
        None, ge=-1, description="best tokens kept (this server's; <= 0: all)"
    )
    n: int = bounded("n", 1, description="continuations of each prompt")
    seed: int | None = bounded("seed", None, description="choice i uses seed + i")
    frequency_penalty: float = Field(
        0.0, ge=-MAX_PENALTY, le=MAX_PENALTY, description="minus count x this, per generated token"
    )
    presence_penalty: float = Field(
        0.0, ge=-MAX_PENALTY, le=MAX_PENALTY, description="minus this once a token was generated"
    )
    logit_bias: dict[str, float] | None = Field(
        None, description="token id -> bias in [-100, 100] added to its logit"
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="up to 4 strings ending the text")
    user: str | None = None
    request_id: str | None = request_id_field()
    use_cache: bool = use_cache_field()

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not -MAX_BIAS <= value <= MAX_BIAS:
                raise ValueError(f"{key}: {value} is outside [-{MAX_BIAS:g}, {MAX_BIAS:g}]")
        return bias


# completions ------------------------------------------------------------------------------
class CompletionRequest(OpenAIBody):
    """POST /v1/completions: text (or token ids) in, text out."""

    unsupported: ClassVar[Accepts] = {
        "best_of": (_null, "null or equal to n"),
        "echo": (lambda v: not v, "false"),
        "suffix": (_empty, "null or an empty string"),
    }

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, texts, token ids, or lists of token ids (one choice set each)"
    )
    max_tokens: int = bounded("max_new_tokens", 16)
    logprobs: int | None = bounded("logprobs", None, description="best tokens reported")
    best_of: int | None = Field(None, ge=1, description="accepted when null or equal to n")
    echo: bool = False
    suffix: str | None = None

    @model_validator(mode="after")
    def _best_of_is_n(self) -> CompletionRequest:
        if self.best_of == self.n:  # the n choices are the n best of n: nothing to pick
            self.best_of = None
        return self


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


class OtherPart(BaseModel):
    """A content part other than text: a refusal (of an earlier assistant turn) is skipped,
    the others (images, audio, files) are refused with 400 naming it."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image_url", "input_audio", "file", "refusal"]


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart | OtherPart] | None = None
    name: str | None = None
    refusal: str | None = None  # an earlier assistant turn's refusal: accepted, not read
    tool_calls: list[dict[str, Any]] | None = None  # accepted when empty (no tools here)
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    def unreadable(self) -> tuple[str, str] | None:
        """(field, why) of the first thing in this message the server cannot read, or None."""
        if self.role in ("tool", "function"):
            return "role", f"{self.role!r} messages need tools, which this server does not run"
        for name in ("tool_calls", "function_call", "audio"):
            if getattr(self, name):
                return name, "not supported by this server"
        for j, part in enumerate(self.content if isinstance(self.content, list) else []):
            if isinstance(part, OtherPart) and part.type != "refusal":  # refusals: not read
                return f"content.{j}.type", f"{part.type!r} parts are not supported (text only)"
        return None


class ChatRequest(OpenAIBody):
    """POST /v1/chat/completions: messages in (through the chat template), a message out."""

    unsupported: ClassVar[Accepts] = {
        "audio": (_null, "null"),
        "function_call": (_null_or("none", "auto"), "null, 'none' or 'auto' (no functions)"),
        "functions": (_empty, "null or []"),
        "modalities": (lambda v: v is None or list(v) == ["text"], "null or ['text']"),
        "moderation": (_null, "null"),
        "prediction": (_null, "null"),
        "prompt_cache_retention": (_null_or("in_memory"), "null or 'in_memory'"),
        "reasoning_effort": (_null, "null"),
        "response_format": (
            lambda v: v is None or v == {"type": "text"},
            "null or {'type': 'text'}",
        ),
        "service_tier": (_null_or("auto", "default"), "null, 'auto' or 'default'"),
        "store": (lambda v: not v, "null or false"),
        "tool_choice": (_null_or("none", "auto"), "null, 'none' or 'auto' (no tools)"),
        "tools": (_empty, "null or []"),
        "verbosity": (_null_or("medium"), "null or 'medium'"),
        "web_search_options": (_null, "null"),
    }

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = bounded("max_new_tokens", None)
    max_completion_tokens: int | None = bounded("max_new_tokens", None)
    logprobs: bool = False
    top_logprobs: int | None = bounded("logprobs", None)
    # accepted, not used: hints and bookkeeping that change no output here
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool = True
    prompt_cache_key: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    safety_identifier: str | None = None
    # accepted at their default only (see `unsupported`)
    audio: dict[str, Any] | None = None
    function_call: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    modalities: list[str] | None = None
    moderation: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    prompt_cache_retention: str | None = None
    reasoning_effort: str | None = None
    response_format: dict[str, Any] | None = None
    service_tier: str | None = None
    store: bool = False
    tool_choice: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None


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
