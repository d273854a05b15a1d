"""Turn validated request bodies into model inputs; model-dependent checks name the field."""

from __future__ import annotations

import codecs
import math
from typing import Any

import torch
from starlette.responses import JSONResponse
from torch import Tensor

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


def model_input(body: ModelInput, model: Transformer, cfg: EngineConfig) -> Tensor:
    """The prompt as tokens [P] int64 or vectors [P, d_in] float32, checked against the model."""
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
    vocab = model.cfg.vocab_size
    if field == "prompt":
        if vocab is None or vocab < 256:
            raise _invalid("prompt", f"vocab_size={vocab} is not byte-level: send token_ids")
        data = body.prompt.encode("utf-8")  # type: ignore[union-attr]
        x = torch.tensor(list(data), dtype=torch.long)
    elif field == "token_ids":
        ids = body.token_ids or []
        bad = [t for t in ids if not 0 <= t < vocab]  # type: ignore[operator]
        if bad:
            raise _invalid("token_ids", f"{bad[0]} is outside [0, vocab_size={vocab})")
        x = torch.tensor(ids, dtype=torch.long)
    else:
        x = _vectors(body.inputs or [], model.cfg.d_in)  # type: ignore[arg-type]
    if len(x) == 0:
        raise _invalid(field, "must hold at least one position")
    if len(x) > cfg.max_prompt_tokens:
        raise _invalid(
            field, f"{len(x)} positions exceed max_prompt_tokens={cfg.max_prompt_tokens}"
        )
    return x


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


class TextDecoder:
    """Token ids -> text pieces; bytes of a multi-byte character wait for the rest of it."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._utf8.decode(bytes([token])) if token < 256 else ""

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


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
