"""`EngineConfig`: the inference engine's limits, memory and modes, validated at construction."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from moekit.config import from_dict

DECODE_MODES = ("auto", "graphs", "static", "eager")
# 'auto', a fraction of free GPU memory ('0.9'), or a size ('8GiB', '512MiB', '1e9' bytes)
_KV_MEMORY = re.compile(r"auto|[0-9]*\.?[0-9]+(e[0-9]+)?\s*([kmgt]i?b?)?", re.IGNORECASE)


@dataclass
class EngineConfig:
    """Knobs of `Engine`; every bad value raises ValueError naming the field."""

    max_batch: int = 32  # sequences decoded together in one forward pass
    max_queue: int = 64  # waiting requests beyond this are refused with 429
    max_new_tokens: int = 1024  # per-request upper bound on generated positions
    max_prompt_tokens: int = 8192  # longer prompts are refused
    max_model_len: int | None = None  # context served (prompt + reply): at most the model's
    # max_seq_len; sizes the KV pages of a row. None: the model's max_seq_len
    prefix_cache_tokens: int = 16384  # positions kept for prefix reuse once unused; 0 = off
    min_prefix: int = 4  # shortest shared prefix worth reusing
    request_timeout_s: float = 120.0  # a request still running after this stops early
    retry_after_s: int = 1  # Retry-After sent with 429
    max_body_bytes: int = 1 << 20  # larger request bodies get 413 before they are read whole
    kv_memory: str = "auto"  # K/V pages: 'auto' (80% of free GPU memory; 1 GiB on CPU), a
    # fraction of free GPU memory ('0.5') or a size ('8GiB'); capped at what rows can use
    page_size: int = 16  # positions per KV page (and per prefix-cache block)
    prefill_chunk: int = 2048  # prompt positions fed per step, so decodes never stall long
    decode_mode: str = "auto"  # graphs (CUDA), static, eager; auto = graphs on CUDA

    def __post_init__(self) -> None:
        positive = ("max_batch", "max_queue", "max_new_tokens", "max_prompt_tokens", "min_prefix")
        for name in (*positive, "page_size", "prefill_chunk", "max_body_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"engine.{name}={value!r} must be an integer >= 1")
        for name in ("prefix_cache_tokens", "retry_after_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"engine.{name}={value!r} must be an integer >= 0")
        n = self.max_model_len
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"engine.max_model_len={n!r} must be an integer >= 1 (or None)")
        t = self.request_timeout_s
        if not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"engine.request_timeout_s={t!r} must be finite and > 0")
        if not isinstance(self.kv_memory, str) or not _KV_MEMORY.fullmatch(self.kv_memory.strip()):
            raise ValueError(
                f"engine.kv_memory={self.kv_memory!r} must be 'auto', a fraction of free GPU"
                " memory (0.5) or a size (8GiB, 512MiB)"
            )
        if self.decode_mode not in DECODE_MODES:
            raise ValueError(
                f"engine.decode_mode={self.decode_mode!r} is not one of {DECODE_MODES}"
            )

    def context_length(self, max_seq_len: int) -> int:
        """Positions one sequence may hold: the model's max_seq_len, or less if asked."""
        return min(max_seq_len, self.max_model_len or max_seq_len)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> EngineConfig:
        """Build from keyword options, refusing names that are not fields."""
        return from_dict(cls, options, "engine option(s)")
