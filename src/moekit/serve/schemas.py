"""Request and response bodies of the HTTP API (pydantic; unknown fields are refused)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from moekit.model.sampling_rules import SAMPLING_BOUNDS

INT_MAX = 2**31 - 1
MAX_LOGPROBS = 20  # best alternatives a request may ask for with each token


def request_id_field() -> Any:
    """A caller's own id for a request: echoed back as the response id."""
    return Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:\-]+$",
        description="your id for this request (echoed as `id`); letters, digits, . _ : -",
    )


def use_cache_field() -> Any:
    return Field(True, description="reuse and offer cached prompt prefixes (false: neither)")


class Strict(BaseModel):
    """No unknown fields, no string-to-number coercion, no NaN or infinity."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ModelInput(Strict):
    """Exactly one of: `prompt` text or `token_ids` (token models), `inputs` (continuous)."""

    prompt: str | None = Field(None, description="text, encoded as UTF-8 bytes (byte-level)")
    token_ids: list[int] | None = Field(None, description="token ids in [0, vocab_size)")
    inputs: list[list[float]] | None = Field(None, description="vectors [P][d_in] (continuous)")


class GenerateRequest(ModelInput):
    # the limits `moekit generate` checks too (SAMPLING_BOUNDS)
    max_new_tokens: int = Field(
        16, **SAMPLING_BOUNDS["max_new_tokens"].field_kwargs(), description="positions to generate"
    )
    temperature: float = Field(
        0.0, **SAMPLING_BOUNDS["temperature"].field_kwargs(), description="0 = greedy"
    )
    top_k: int | None = Field(None, **SAMPLING_BOUNDS["top_k"].field_kwargs())
    top_p: float | None = Field(None, **SAMPLING_BOUNDS["top_p"].field_kwargs())
    seed: int | None = Field(None, **SAMPLING_BOUNDS["seed"].field_kwargs())
    stream: bool = Field(False, description="Server-Sent Events, one per new position")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="report each token's logprob and this many best"
    )
    request_id: str | None = request_id_field()
    use_cache: bool = use_cache_field()


class TopLogprob(BaseModel):
    token_id: int
    logprob: float


class TokenLogprob(BaseModel):
    """The model's log-probability of a generated token, and of its best alternatives."""

    token_id: int
    logprob: float
    top: list[TopLogprob]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    id: str
    text: str | None = None  # token models that read text (tokenizer or bytes)
    token_ids: list[int] | None = None  # token models
    outputs: list[list[float]] | None = None  # continuous models: [N][d_out]
    logprobs: list[TokenLogprob] | None = None  # when asked
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
    tokens: list[str] | None = None  # each position's token as text (token models)
    layers: list[LayerRouting]


class ErrorBody(BaseModel):
    message: str
    type: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
    detail: list[dict[str, Any]] | None = None
