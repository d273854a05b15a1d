"""Wall-clock timing for whole-layer benchmarks (stage 3 kernels use triton.testing.do_bench)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(
    fn: Callable[[], object],
    repeats: int = 15,
    warmup: int = 3,
    device: torch.device | str = "cpu",
) -> float:
    """Median wall time of fn() in milliseconds after `warmup` untimed calls.

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
    return statistics.median(times)
