"""`EngineConfig`: the inference engine's limits and cache sizes, validated at construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from moekit.config import strict_from_dict


@dataclass
class EngineConfig:
    """Knobs of `Engine`; every bad value raises ValueError naming the field."""

    max_batch: int = 32  # sequences decoded together in one forward pass
    max_queue: int = 64  # waiting requests beyond this are refused with 429
    max_new_tokens: int = 1024  # per-request upper bound on generated positions
    max_prompt_tokens: int = 8192  # longer prompts are refused (only the last window is fed)
    prefix_cache_tokens: int = 16384  # LRU bound on positions kept by the prefix cache; 0 = off
    min_prefix: int = 4  # shortest shared prefix worth reusing
    request_timeout_s: float = 120.0  # a request still running after this stops early
    retry_after_s: int = 1  # Retry-After sent with 429

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_new_tokens", "max_prompt_tokens", "min_prefix"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"engine.{name}={value!r} must be an integer >= 1")
        for name in ("prefix_cache_tokens", "retry_after_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"engine.{name}={value!r} must be an integer >= 0")
        t = self.request_timeout_s
        if not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"engine.request_timeout_s={t!r} must be finite and > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> EngineConfig:
        """Build from keyword options, refusing names that are not fields."""
        return strict_from_dict(cls, options, "engine option(s)")
