"""Request and response bodies of the HTTP API (pydantic; unknown fields are refused)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from moekit.model.sampling_rules import SAMPLING_BOUNDS, Bound

MAX_LOGPROBS = 20  # best alternatives a request may ask for with each token
MAX_CHOICES = 16  # n: continuations of one prompt per request
# every numeric limit of a request body: the sampling options `moekit generate` checks too,
# then the server's own; OpenAI's temperature range is narrower than ours
BOUNDS = {
    **SAMPLING_BOUNDS,
    "openai_temperature": Bound(ge=0.0, le=2.0),
    "logprobs": Bound(ge=0, le=MAX_LOGPROBS),
    "n": Bound(ge=1, le=MAX_CHOICES),
}


def bounded(name: str, default: Any, **kw: Any) -> Any:
    """A pydantic `Field` holding the limits `BOUNDS[name]`."""
    return Field(default, **BOUNDS[name].field_kwargs(), **kw)


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
    max_new_tokens: int = bounded("max_new_tokens", 16, description="positions to generate")
    temperature: float = bounded("temperature", 0.0, description="0 = greedy")
    top_k: int | None = bounded("top_k", None)
    top_p: float | None = bounded("top_p", None)
    seed: int | None = bounded("seed", None)
    stream: bool = Field(False, description="Server-Sent Events, one per new position")
    logprobs: int | None = bounded(
        "logprobs", None, description="report each token's logprob and this many best"
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
