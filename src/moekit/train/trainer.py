"""`Trainer`: the training loop, evaluation, checkpoints, resume and graceful stop.

Data for step s is `task.train_batch(s, micro)` and the LR is a function of s, so resuming
from a checkpoint (weights, optimizer, scaler, RNG states, step) reproduces the loss curve
of an uninterrupted run exactly on CPU in fp32. SIGINT / SIGTERM finish the current step,
write a checkpoint and return normally.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model

from moekit.model import ModelConfig, Transformer
from moekit.model.io import WEIGHTS_FILE
from moekit.tasks import Batch, Task, build_task
from moekit.train.checkpoint import (
    STATE_FILE,
    pick_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from moekit.train.config import RunConfig
from moekit.train.live import LiveView
from moekit.train.logging import RunLog
from moekit.train.metrics import evaluate_model, step_metrics
from moekit.train.optim import build_optimizer, set_lr

RUN_FILE = "run.json"


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python and NumPy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def model_config_for(cfg: ModelConfig, task: Task) -> ModelConfig:
    """The run's model config with the task's input/output sizes filled in."""
    fields = task.model_fields()
    for name, value in fields.items():
        given = getattr(cfg, name)
        if given is not None and given != value:
            raise ValueError(f"model.{name}={given} conflicts with task {task.name} ({value})")
    return replace(cfg, **fields)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    """Trains `cfg.model` on `cfg.task`; everything goes into the run directory `cfg.out`."""

    def __init__(self, cfg: RunConfig, task: Task | None = None, title: str = "training") -> None:
        self.cfg, self.title = cfg, title
        self.run_dir = Path(cfg.out)
        self.ckpt_dir = self.run_dir / "checkpoints"
        seed_everything(cfg.seed)
        self.task = task or build_task(cfg.task, cfg.seed)
        self.device = resolve_device(cfg.train.device)
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        self.model = Transformer(model_config_for(cfg.model, self.task)).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.dtype = self._autocast_dtype(cfg.train.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.step = 0
        self.log = RunLog(self.run_dir)
        self.val = [b.to(self.device) for b in self.task.val_batches(cfg.train.eval_batch_size)]
        self.stop_signal: int | None = None
        self.last_eval: dict[str, Any] | None = None
        self.throughput: list[float] = []

    def _autocast_dtype(self, precision: str) -> torch.dtype | None:
        if precision == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else None
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # one optimiser step ---------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """Forward/backward over grad_accum micro-batches, clip, step. Returns device tensors."""
        tc = self.cfg.train
        self.model.train()
        lrs = set_lr(self.optimizer, self.step, tc)
        parts: list[dict[str, Any]] = []
        for micro in range(tc.grad_accum):
            batch = self.task.train_batch(self.step, micro, tc.batch_size).to(self.device)
            with self.autocast():
                out = self.model(batch.x, batch.y)
            self.scaler.scale(out.loss / tc.grad_accum).backward()
            parts.append(step_metrics(out))
        self.scaler.unscale_(self.optimizer)
        max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return {"step": self.step + 1, **_mean(parts), "lr": lrs, "grad_norm": grad_norm}

    # evaluation -----------------------------------------------------------------------------
    def evaluate(self, batches: list[Batch] | None = None) -> dict[str, Any]:
        """Validation loss, task metrics and category x expert counts per MoE layer."""
        record = evaluate_model(self.model, self.task, batches or self.val, self.autocast)
        return {"step": self.step, **record}

    # checkpoints ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": {"kind": "warmup_cosine", "step": self.step},
            "rng": rng_state(),
            "data": {"seed": self.cfg.seed, "next_step": self.step},
            "run": self.cfg.to_dict(),
        }

    def save(self, metric: float | None) -> Path:
        path = save_checkpoint(self.ckpt_dir, self.model, self.state(), self.step, metric)
        (path / "run.json").write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        tc = self.cfg.train
        prune_checkpoints(self.ckpt_dir, tc.keep_last, tc.keep_best)
        return path

    def restore(self, path: str | Path) -> Path:
        """Load weights and trainer state from a checkpoint (or a run dir's latest one)."""
        ckpt = pick_checkpoint(path, which="latest")
        load_model(self.model, str(ckpt / WEIGHTS_FILE), device=str(self.device))
        state = torch.load(ckpt / STATE_FILE, map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        set_rng_state(state["rng"])
        self.log.truncate_after(self.step)
        return ckpt

    # the loop -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT / SIGTERM ask the loop to stop after the current step (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, _frame: Any) -> None:
            self.stop_signal = signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _write_run_info(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        info = {
            "task": self.task.name,
            "categories": list(self.task.categories),
            "metric": self.task.metric,
            "moe_layers": self.model.moe_layers(),
            "params": self.model.num_params(),
            "model": self.model.cfg.to_dict(),
            "run": self.cfg.to_dict(),
        }
        (self.run_dir / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")

    def _flush(self, view: LiveView, t0: float) -> float:
        records = self.log.buffer
        if not records:
            return t0
        tokens = len(records) * self.tokens_per_step
        rate = tokens / max(time.perf_counter() - t0, 1e-9)
        for rec in records:
            rec["tokens_per_s"] = rate
        self.throughput.append(rate)
        synced = self.log.flush()
        if synced:
            view.update(self.step, synced[-1])
        return time.perf_counter()

    @property
    def tokens_per_step(self) -> int:
        tc = self.cfg.train
        return tc.batch_size * tc.grad_accum * self.cfg.task.seq_len

    def fit(self, resume: str | Path | None = None) -> dict[str, Any]:
        """Train to cfg.train.steps (from a checkpoint when `resume`); returns a summary."""
        tc = self.cfg.train
        if resume is not None:
            self.restore(resume)
        elif self.log.path.exists():
            self.log.path.unlink()  # a fresh run in an old directory starts a fresh log
        self._write_run_info()
        view = LiveView(tc.steps, tc.live, self.title)
        t0 = time.perf_counter()
        ckpt = None
        with self._stop_on_signals():
            while self.step < tc.steps and self.stop_signal is None:
                self.log.add_step(self.train_step())
                self.step += 1
                done = self.step == tc.steps
                if self.step % tc.log_interval == 0 or done:
                    t0 = self._flush(view, t0)
                metric, slow = None, False
                if self.step % tc.eval_interval == 0 or done:
                    self.last_eval = self.evaluate()
                    self.log.add_eval(self.last_eval)
                    view.eval(self.step, self.last_eval)
                    metric, slow = self.last_eval[self.task.metric], True
                if self.step % tc.checkpoint_every == 0 or done:
                    ckpt, slow = self.save(metric), True
                if tc.plot_interval and self.step % tc.plot_interval == 0:
                    self.plot(final=False)
                    slow = True
                if slow:  # throughput counts training time only
                    t0 = time.perf_counter()
            if self.stop_signal is not None:
                self._flush(view, t0)
                ckpt = self.save(None)
        view.close()
        plots = self.plot(final=True) if self.stop_signal is None else []
        return self.summary(ckpt, plots)

    def plot(self, final: bool) -> list[Path]:
        from moekit.viz import plot_run

        paths = plot_run(self.run_dir)
        if final:
            paths += self.task.plots(self.model, self.run_dir / "plots")
        return paths

    def summary(self, ckpt: Path | None, plots: list[Path]) -> dict[str, Any]:
        ev = self.last_eval or {}
        return {
            "step": self.step,
            "stopped_by_signal": self.stop_signal,
            "val": {k: v for k, v in ev.items() if k not in ("step", "routing")},
            "routing": ev.get("routing", {}),
            "tokens_per_s": float(np.median(self.throughput)) if self.throughput else 0.0,
            "params": self.model.num_params(),
            "checkpoint": ckpt,
            "plots": plots,
        }


def _mean(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Average micro-batch metrics (nested dicts of tensors)."""
    if len(parts) == 1:
        return parts[0]
    out: dict[str, Any] = {}
    for key, value in parts[0].items():
        if isinstance(value, dict):
            out[key] = _mean([p[key] for p in parts])
        else:
            out[key] = sum(p[key] for p in parts) / len(parts)
    return out
