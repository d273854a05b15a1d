"""`ServeStats`: counters the engine keeps since start, read by /v1/stats and /metrics."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

# upper bounds (seconds) of the latency / time-to-first-token histogram buckets
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# and of the inter-token latency buckets: a decode step takes milliseconds on a GPU
ITL_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


@dataclass
class Histogram:
    """Cumulative bucket counts (Prometheus style) plus a window of recent values."""

    bounds: tuple[float, ...] = BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=2048))

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.n += 1
        self.recent.append(value)

    def summary(self) -> dict[str, float | None]:
        r = list(self.recent)
        return {
            "p50": _percentile(r, 0.5),
            "p95": _percentile(r, 0.95),
            "p99": _percentile(r, 0.99),
        }


@dataclass
class ServeStats:
    """Request, token, batch and per-expert counts; mutated only by the engine's event loop."""

    moe_layers: list[int]
    n_experts: int
    started: float = field(default_factory=time.monotonic)
    requests: int = 0  # accepted into the queue
    rejected: int = 0  # refused with 429 (queue full)
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> count
    prompt_tokens: int = 0
    generated_tokens: int = 0
    max_batch: int = 1  # rows a decode step can hold: occupancy = batch / max_batch
    steps: int = 0  # engine steps that decoded at least one sequence
    batched_sequences: int = 0  # sum of decode batch sizes
    last_batch: int = 0  # sequences in the latest decode step
    prefill_tokens: int = 0  # prompt positions fed (prefix-cache hits not counted)
    latency: Histogram = field(default_factory=Histogram)
    ttft: Histogram = field(default_factory=Histogram)
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))  # between outputs
    recent_tokens: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=4096))
    expert_tokens: Tensor = field(init=False)  # [n MoE layers, E] token-slots routed

    def __post_init__(self) -> None:
        self.expert_tokens = torch.zeros(len(self.moe_layers), self.n_experts, dtype=torch.long)

    def observe_step(self, decoded: int, prefilled: int) -> None:
        """A step that decoded `decoded` sequences and fed `prefilled` prompt positions."""
        self.last_batch = decoded
        if decoded:
            self.steps += 1
            self.batched_sequences += decoded
        self.prefill_tokens += prefilled

    def occupancy(self) -> dict[str, float]:
        """Decode batch size over max_batch: in the latest step and averaged over steps."""
        mean = self.batched_sequences / self.steps if self.steps else 0.0
        return {"last": self.last_batch / self.max_batch, "mean": mean / self.max_batch}

    def add_tokens(self, n: int) -> None:
        self.generated_tokens += n
        self.recent_tokens.append((time.monotonic(), n))

    def tokens_per_s(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last `window` seconds."""
        now = time.monotonic()
        span = min(window, max(now - self.started, 1e-9))
        return sum(n for t, n in self.recent_tokens if now - t <= window) / span

    def expert_load(self) -> list[dict]:
        out = []
        for layer, row in zip(self.moe_layers, self.expert_tokens.tolist(), strict=True):
            total = sum(row)
            out.append(
                {
                    "layer": layer,
                    "tokens": row,
                    "fraction": [c / total if total else 0.0 for c in row],
                }
            )
        return out
