"""The trainer's batches: built ahead on a thread, pinned, copied without blocking (CUDA).

A step's micro-batches are a pure function of the step (`Task.train_batch`), so building them
early changes no number. On CUDA a background thread builds the next `depth` steps in pinned
host memory while the GPU works, and each is copied with `non_blocking=True`; on the CPU the
batches are built when asked, on the calling thread (a second thread would only compete for
the same cores).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from moekit.model.task import Batch

StepBatches = Callable[[int], list[Batch]]  # step -> its micro-batches, on the host


def _pinned(batches: list[Batch]) -> list[Batch]:
    return [Batch(b.x.pin_memory(), b.y.pin_memory(), b.category.pin_memory()) for b in batches]


def _to_device(batch: Batch, device: torch.device) -> Batch:
    move = {"device": device, "non_blocking": True}
    return Batch(batch.x.to(**move), batch.y.to(**move), batch.category.to(**move))


class Prefetcher:
    """`get(step)` returns step's micro-batches on `device`; on CUDA built `depth` steps ahead."""

    def __init__(
        self, make: StepBatches, device: torch.device, depth: int = 2, ahead: bool | None = None
    ) -> None:
        self.make, self.device, self.depth = make, device, depth
        ahead = device.type == "cuda" if ahead is None else ahead  # None: on CUDA only
        self._pool = (
            ThreadPoolExecutor(1, thread_name_prefix="moekit-data") if ahead and depth else None
        )
        self._pending: dict[int, Future[list[Batch]]] = {}

    def _build(self, step: int) -> list[Batch]:
        batches = self.make(step)
        return _pinned(batches) if self.device.type == "cuda" else batches

    def get(self, step: int) -> list[Batch]:
        if self._pool is None:
            return [b.to(self.device) for b in self.make(step)]
        for ahead in range(step, step + self.depth + 1):
            if ahead not in self._pending:
                self._pending[ahead] = self._pool.submit(self._build, ahead)
        for stale in [s for s in self._pending if s < step]:  # a resume jumped past them
            self._pending.pop(stale).cancel()
        host = self._pending.pop(step).result()
        return [_to_device(b, self.device) for b in host]

    def close(self) -> None:
        if self._pool is not None:
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True)
            self._pool = None
