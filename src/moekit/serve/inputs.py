"""Turn validated request bodies into model inputs; model-dependent checks name the field."""

from __future__ import annotations

import math
from typing import Any

import torch
from starlette.responses import JSONResponse
from torch import Tensor

from moekit.model.codec import Codec
from moekit.model.transformer import Transformer
from moekit.serve.config import EngineConfig
from moekit.serve.schemas import ModelInput


class ApiError(Exception):
    """A client mistake (4xx) or an overload answer, rendered as an `ErrorResponse`."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.kind = status, message, field, kind
        self.headers = headers


def error_response(
    status: int,
    message: str,
    kind: str,
    field: str | None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """The JSON body of every error answer: {"error": {"message", "type", "field"}, ...}."""
    body: dict[str, Any] = {"error": {"message": message, "type": kind, "field": field}}
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers)


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(422, f"{field}: {message}", field)


def model_input(
    body: ModelInput, model: Transformer, cfg: EngineConfig, codec: Codec | None
) -> Tensor:
    """The prompt as tokens [P] int64 or vectors [P, d_in] float32, checked against the model.

    Text goes through `codec` (the model's tokenizer, or UTF-8 bytes for byte-level models).
    """
    given = [name for name in ("prompt", "token_ids", "inputs") if getattr(body, name) is not None]
    expected = "prompt or token_ids" if model.is_lm else "inputs"
    if len(given) != 1:
        field = given[-1] if given else ("prompt" if model.is_lm else "inputs")
        raise _invalid(field, f"send exactly one of {expected} for this model")
    field = given[0]
    if model.is_lm and field == "inputs":
        raise _invalid("inputs", "this is a token model: send prompt or token_ids")
    if not model.is_lm and field != "inputs":
        raise _invalid(field, "this is a continuous model: send inputs (a list of vectors)")
    if field == "prompt":
        x = torch.tensor(text_ids(body.prompt, "prompt", codec, model), dtype=torch.long)  # type: ignore[arg-type]
    elif field == "token_ids":
        x = torch.tensor(check_ids(body.token_ids or [], "token_ids", model), dtype=torch.long)
    else:
        x = _vectors(body.inputs or [], model.cfg.d_in)  # type: ignore[arg-type]
    check_prompt_length(len(x), field, cfg, cfg.context_length(model.cfg.max_seq_len))
    return x


def text_ids(
    text: str, field: str, codec: Codec | None, model: Transformer, chat: bool = False
) -> list[int]:
    """Text as token ids through the model's codec; 422 naming `field` if it takes no text."""
    if codec is None:
        vocab = model.cfg.vocab_size
        raise _invalid(
            field, f"vocab_size={vocab} is not byte-level and there is no tokenizer: send token ids"
        )
    return check_ids(codec.encode(text, chat), field, model)


def check_ids(ids: list[int], field: str, model: Transformer) -> list[int]:
    vocab = model.cfg.vocab_size or 0
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise _invalid(field, f"{bad[0]} is outside [0, vocab_size={vocab})")
    return ids


def check_prompt_length(n: int, field: str, cfg: EngineConfig, context: int) -> None:
    """422 for an empty prompt or one over max_prompt_tokens; 400 past the context (never cut)."""
    if n == 0:
        raise _invalid(field, "must hold at least one position")
    if n > context:
        raise ApiError(
            400,
            f"{field}: this model's maximum context length is {context} tokens, but the prompt"
            f" has {n} tokens; shorten it",
            field,
        )
    if n > cfg.max_prompt_tokens:
        raise _invalid(field, f"{n} positions exceed max_prompt_tokens={cfg.max_prompt_tokens}")


def check_total_length(prompt: int, max_tokens: int, field: str, context: int) -> None:
    """400 when prompt + completion cannot fit the context (OpenAI endpoints refuse, as vLLM's
    do, instead of sliding the window)."""
    if prompt + max_tokens > context:
        raise ApiError(
            400,
            f"{field}: this model's maximum context length is {context} tokens, but you requested"
            f" {prompt + max_tokens} tokens ({prompt} in the prompt, {max_tokens} for the"
            f" completion); shorten the prompt or lower {field}",
            field,
        )


def room_left(prompt: int, cfg: EngineConfig, context: int) -> int:
    """The completion length a request that gives none gets: the server's max_new_tokens, or
    what the context leaves after the prompt (at least 1, so a full prompt is refused)."""
    return max(1, min(cfg.max_new_tokens, context - prompt))


def _vectors(rows: list[list[float]], d_in: int) -> Tensor:
    for i, row in enumerate(rows):
        if len(row) != d_in:
            raise _invalid(f"inputs[{i}]", f"has {len(row)} values, the model needs d_in={d_in}")
        if not all(math.isfinite(v) for v in row):
            raise _invalid(f"inputs[{i}]", "holds NaN or infinity")
    x = torch.tensor(rows, dtype=torch.float32).reshape(len(rows), d_in)  # [P, d_in]
    if not torch.isfinite(x).all():  # finite doubles can overflow float32
        raise _invalid("inputs", "values overflow float32")
    return x


def check_max_new(value: int, field: str, model: Transformer, cfg: EngineConfig) -> None:
    if value > cfg.max_new_tokens:
        raise _invalid(field, f"{value} exceeds the server limit {cfg.max_new_tokens}")
    if not model.is_lm and model.cfg.d_out != model.cfg.d_in and value > 1:
        raise _invalid(field, "must be 1: this model's d_out != d_in, so it cannot roll out")


class StopMatcher:
    """Cut a text stream at the first stop string, holding back what could start one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self._buffer = ""
        self.stopped = False

    def feed(self, piece: str, final: bool = False) -> str:
        """Text safe to send now; after a stop string is found, nothing more."""
        if self.stopped:
            return ""
        self._buffer += piece
        cut = min((i for s in self.stops if (i := self._buffer.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._buffer = self._buffer[:cut], ""
            return out
        keep = 0 if final else min(self.hold, len(self._buffer))
        out = self._buffer[: len(self._buffer) - keep]
        self._buffer = self._buffer[len(out) :]
        return out
