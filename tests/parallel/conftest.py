"""Run a function on W gloo processes (forked, rendezvous through a file in tmp_path)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# a collective mismatch deadlocks: fail the test instead of hanging CI (generous, since four
# ranks share two loaded cores)
_TIMEOUT_S = 300.0


def _entry(rank: int, fn: Callable, world: int, path: str, args: tuple) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    fn(rank, world, *args)  # a failure ends this rank now: its error is the one reported
    # Gloo's side of a connection can be done before its peer's: a rank that closed its
    # sockets while a slower one still connected or read gave "Connection closed by peer".
    # So no rank tears down before every rank has finished (a barrier on the file store).
    store.set(f"finished-{rank}", "1")
    store.wait([f"finished-{r}" for r in range(world)], timedelta(seconds=_TIMEOUT_S))
    dist.destroy_process_group()


def _launch(tmp_path: Path, fn: Callable, world: int, *args) -> None:
    store = tmp_path / f"store-{world}-{time.monotonic_ns()}"
    ctx = mp.start_processes(
        _entry, args=(fn, world, str(store), args), nprocs=world, join=False, start_method="fork"
    )
    deadline = time.monotonic() + _TIMEOUT_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    os.kill(p.pid, 9)
            pytest.fail(f"{fn.__name__} on {world} ranks did not finish in {_TIMEOUT_S:.0f}s")


@pytest.fixture
def launch(tmp_path: Path) -> Callable[..., None]:
    """launch(fn, world, *args): run fn(rank, world, *args) on `world` ranks; raise on error."""
    return lambda fn, world, *args: _launch(tmp_path, fn, world, *args)
