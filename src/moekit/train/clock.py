"""Training wall-clock: the seconds spent training, evaluation, checkpoints and plots excluded.

The trainer starts it once the first step is done, so compilation is not counted either.

Validation loss against this clock is how models of different speeds are compared at equal
time (`train.time_budget_s`). The device runs ahead of the host, so the clock is read only
after a device synchronisation, at points that synchronise anyway (log flush, evaluation).
"""

from __future__ import annotations

import time

import torch


def _sync_device(device: torch.device) -> None:
    """Wait for the queued work. NOTE: host sync (CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainClock:
    """Runs between `resume` and `pause`; `total` carries over a resume from a checkpoint."""

    def __init__(self, device: torch.device, total: float = 0.0) -> None:
        self.device, self.total = device, total
        self._since: float | None = None

    @property
    def running(self) -> bool:
        return self._since is not None

    def resume(self) -> None:
        if self._since is None:
            self._since = time.perf_counter()

    def _sync_resume(self) -> None:
        """Start from the moment the queued work is done. NOTE: host sync."""
        _sync_device(self.device)
        self.resume()

    def _sync_pause(self) -> None:
        """Stop the clock once the queued training work is done. NOTE: host sync."""
        if self._since is not None:
            _sync_device(self.device)
            self.total += time.perf_counter() - self._since
            self._since = None

    def _sync_read(self) -> float:
        """Seconds trained so far, the queued work included. NOTE: host sync."""
        if self._since is None:
            return self.total
        _sync_device(self.device)
        return self.total + time.perf_counter() - self._since
