"""JSONL run log: one record per training step, plus evaluation records.

Step metrics stay device tensors in a buffer; every `log_interval` steps they are copied to
the host in one transfer (`_sync_records`) and written, so training never waits on the
logger in between.

Besides the step's own metrics, each step record carries fields set at that flush:
`tokens_per_s`, `step_ms` (host-clock milliseconds per step over the log interval) and
`peak_mem_mib` (`peak_memory_mib`: the device's peak allocation, or the process's max RSS on
the CPU).
"""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

LOG_FILE = "metrics.jsonl"


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far in MiB: CUDA's peak allocation on `device`, else the process's max
    RSS. Neither read waits on the device."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def _collect(value: Any, out: list[Tensor]) -> None:
    if isinstance(value, Tensor):
        out.append(value.detach().float().reshape(-1))
    elif isinstance(value, dict):
        for v in value.values():
            _collect(v, out)


def _fill(value: Any, flat: list[float], pos: list[int]) -> Any:
    if isinstance(value, Tensor):
        n, i = value.numel(), pos[0]
        pos[0] += n
        return flat[i] if value.dim() == 0 else _reshape(flat[i : i + n], list(value.shape))
    if isinstance(value, dict):
        return {k: _fill(v, flat, pos) for k, v in value.items()}
    return value


def _sync_records(buffer: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tensors (nested in dicts too) -> Python numbers. NOTE: host sync, one transfer."""
    tensors: list[Tensor] = []
    for rec in buffer:
        _collect(rec, tensors)
    if not tensors:
        return buffer
    flat = torch.cat(tensors).cpu().tolist()
    pos = [0]
    return [_fill(rec, flat, pos) for rec in buffer]


def _reshape(vals: list[float], shape: list[int]) -> list[Any]:
    if len(shape) == 1:
        return vals
    step = len(vals) // shape[0]
    return [_reshape(vals[j * step : (j + 1) * step], shape[1:]) for j in range(shape[0])]


class RunLog:
    """Appends records to run_dir/metrics.jsonl; step records are buffered until `flush`."""

    def __init__(
        self, run_dir: str | Path, finish: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    ) -> None:
        self.path = Path(run_dir) / LOG_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.buffer: list[dict[str, Any]] = []
        self.finish = finish  # applied to each synced step record before it is written

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (written after the checkpoint a run resumes from)."""
        if not self.path.exists():
            return
        keep = [r for r in read_log(self.path) if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def add_step(self, record: dict[str, Any]) -> None:
        self.buffer.append({"kind": "train", **record})

    def flush(self) -> list[dict[str, Any]]:
        """Sync and write buffered step records; return them as plain numbers."""
        records = _sync_records(self.buffer)
        self.buffer = []
        if self.finish is not None:
            records = [self.finish(r) for r in records]
        self._write(records)
        return records

    def add_eval(self, record: dict[str, Any]) -> None:
        self._write([{"kind": "eval", **record}])

    def _write(self, records: list[dict[str, Any]]) -> None:
        if records:
            with self.path.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """All records of a run log (a metrics.jsonl file or its run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / LOG_FILE
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill; later lines are fine
                continue
    return records
