"""Wall-clock timing for whole-layer benchmarks (stage 3 kernels use triton.testing.do_bench)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sample_ms(
    fn: Callable[[], object],
    repeats: int = 15,
    warmup: int = 3,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Wall time of each of `repeats` calls of fn() in milliseconds, after `warmup` untimed ones.

    On CUDA each call is followed by a device synchronisation, so the time is the work's.
    """
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median_ms(
    fn: Callable[[], object],
    repeats: int = 15,
    warmup: int = 3,
    device: torch.device | str = "cpu",
) -> float:
    """Median of `sample_ms`: the figure a table shows."""
    return statistics.median(sample_ms(fn, repeats, warmup, device))


def spread_ms(times: list[float]) -> dict[str, float]:
    """Median, min and max of timed calls: what a chart draws as a point and its band."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}
