"""Request and response bodies of the HTTP API (pydantic; unknown fields are refused)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

INT_MAX = 2**31 - 1


class Strict(BaseModel):
    """No unknown fields, no string-to-number coercion, no NaN or infinity."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ModelInput(Strict):
    """Exactly one of: `prompt` text or `token_ids` (token models), `inputs` (continuous)."""

    prompt: str | None = Field(None, description="text, encoded as UTF-8 bytes (byte-level)")
    token_ids: list[int] | None = Field(None, description="token ids in [0, vocab_size)")
    inputs: list[list[float]] | None = Field(None, description="vectors [P][d_in] (continuous)")


class GenerateRequest(ModelInput):
    max_new_tokens: int = Field(16, ge=1, le=INT_MAX, description="positions to generate")
    temperature: float = Field(0.0, ge=0.0, le=1e4, description="0 = greedy")
    top_k: int | None = Field(None, ge=1, le=INT_MAX)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = Field(False, description="Server-Sent Events, one per new position")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    id: str
    text: str | None = None  # token models with a byte vocabulary
    token_ids: list[int] | None = None  # token models
    outputs: list[list[float]] | None = None  # continuous models: [N][d_out]
    finish_reason: str
    usage: Usage
    prefix_cache_tokens: int = Field(description="prompt positions reused from the prefix cache")
    ttft_s: float | None = None
    latency_s: float


class RouteRequest(ModelInput):
    pass


class LayerRouting(BaseModel):
    layer: int
    n_experts: int
    k: int
    experts: list[list[int]] = Field(description="[P][k] expert ids; -1 = dropped")
    weights: list[list[float]] = Field(description="[P][k] gate weights as applied")


class RouteResponse(BaseModel):
    positions: int
    tokens: list[str] | None = None  # each position's byte as text (token models)
    layers: list[LayerRouting]


class ErrorBody(BaseModel):
    message: str
    type: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
    detail: list[dict[str, Any]] | None = None


# OpenAI-compatible completions ------------------------------------------------------------
class StreamOptions(Strict):
    include_usage: bool = False


class CompletionRequest(Strict):
    """The subset of OpenAI's /v1/completions this server implements (n = 1, no logprobs)."""

    model: str
    prompt: str | list[str] = Field(description="text, or a list holding one text")
    max_tokens: int = Field(16, ge=1, le=INT_MAX)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="up to 4 strings ending the text")
    n: Literal[1] = 1
    echo: Literal[False] = False
    logprobs: None = None
    user: str | None = None


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
