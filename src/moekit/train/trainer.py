"""`Trainer`: the training loop, evaluation, checkpoints, resume and graceful stop.

Data for step s is `task.train_batch(s, micro)` and the LR is a function of s, so resuming
from a checkpoint (weights, optimizer, scaler, RNG states, step) reproduces the loss curve
of an uninterrupted run exactly on CPU in fp32. SIGINT / SIGTERM finish the current step,
write a checkpoint and return normally.

With `parallel.ep = N > 1` (one process per rank, started by torchrun) every MoE layer's
experts are split over the N ranks. `train.batch_size` is per rank: the step's global batch
is `task.train_batch(s, micro, N * batch_size)` and rank r trains on rows
[r * batch_size, (r + 1) * batch_size). Gradients are averaged over ranks and clipped by the
whole model's norm; rank 0 alone logs, plots and writes checkpoints, which hold the dense
model (`moekit.load` reads them). Logged step metrics are rank 0's; evaluation runs the full
validation set on every rank. Such runs cannot be resumed (the optimizer state is sharded).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
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
import torch.distributed as dist
from safetensors.torch import load_model

from moekit.model import ModelConfig, Transformer
from moekit.model.io import WEIGHTS_FILE
from moekit.parallel import parallelize_experts
from moekit.parallel.checkpoint import to_dense_model
from moekit.parallel.data_parallel import clip_grad_norm_, reduce_gradients_
from moekit.tasks import Batch, Task, build_task
from moekit.train.checkpoint import (
    STATE_FILE,
    checkpoint_name,
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


_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_expert_parallel(ep: int, device: torch.device) -> tuple[torch.device, bool]:
    """Join the torchrun process group for `parallel.ep` (gloo on CPU, NCCL on CUDA).

    Returns this rank's device (cuda:LOCAL_RANK on GPUs) and whether the group was created
    here. Raises ValueError outside torchrun or when ep is not the world size.
    """
    created = False
    if not dist.is_initialized():
        missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
        if missing:
            raise ValueError(
                f"parallel.ep={ep} needs one process per rank: launch with "
                f"`torchrun --nproc-per-node {ep} -m moekit.cli train CONFIG --parallel.ep {ep}` "
                f"({', '.join(missing)} not set)"
            )
        world = int(os.environ["WORLD_SIZE"])
        if world != ep:
            raise ValueError(f"parallel.ep={ep} must equal the number of processes ({world})")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    if dist.get_world_size() != ep:
        raise ValueError(
            f"parallel.ep={ep} must equal the number of processes ({dist.get_world_size()})"
        )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device, created


class Trainer:
    """Trains `cfg.model` on `cfg.task`; everything goes into the run directory `cfg.out`."""

    def __init__(self, cfg: RunConfig, task: Task | None = None, title: str = "training") -> None:
        self.cfg, self.title = cfg, title
        self.run_dir = Path(cfg.out)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.ep = cfg.parallel.ep
        self.device = resolve_device(cfg.train.device)
        self._owns_group = False
        if self.ep > 1:
            self.device, self._owns_group = init_expert_parallel(self.ep, self.device)
        self.rank = dist.get_rank() if self.ep > 1 else 0
        self.is_main = self.rank == 0
        seed_everything(cfg.seed)  # the same seed on every rank: identical initial weights
        self.task = task or build_task(cfg.task, cfg.seed)
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        self.model = Transformer(model_config_for(cfg.model, self.task)).to(self.device)
        self.params = self.model.num_params()  # of the whole model, before any sharding
        if self.ep > 1:
            self.model = parallelize_experts(self.model, None)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.dtype = self._autocast_dtype(cfg.train.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.step = 0
        self.log = RunLog(self.run_dir)
        self.val = [b.to(self.device) for b in self.task.val_batches(cfg.train.eval_batch_size)]
        self.stop_signal: int | None = None
        self._signal_seen = 0  # expert parallel: a signal this rank got, agreed on each step
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
            batch = self._train_batch(micro)
            with self.autocast():
                out = self.model(batch.x, batch.y)
            self.scaler.scale(out.loss / tc.grad_accum).backward()
            parts.append(step_metrics(out))
        if self.ep > 1:
            reduce_gradients_(self.model)  # mean over ranks, experts included
        self.scaler.unscale_(self.optimizer)
        max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
        if self.ep > 1:
            grad_norm = clip_grad_norm_(self.model, max_norm)  # whole model's norm
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return {"step": self.step + 1, **_mean(parts), "lr": lrs, "grad_norm": grad_norm}

    def _train_batch(self, micro: int) -> Batch:
        """This rank's micro-batch: its slice of the step's global batch."""
        B = self.cfg.train.batch_size
        batch = self.task.train_batch(self.step, micro, B * self.ep)
        if self.ep > 1:
            rows = slice(self.rank * B, (self.rank + 1) * B)
            batch = Batch(batch.x[rows], batch.y[rows], batch.category[rows])
        return batch.to(self.device)

    # evaluation -----------------------------------------------------------------------------
    def evaluate(self, batches: list[Batch] | None = None) -> dict[str, Any]:
        """Validation loss, task metrics and category x expert counts per MoE layer."""
        record = evaluate_model(self.model, self.task, batches or self.val, self.autocast)
        return {"step": self.step, **record}

    # checkpoints ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            # expert parallel: each rank holds its experts' moments, so none is saved
            "optimizer": self.optimizer.state_dict() if self.ep == 1 else None,
            "scaler": self.scaler.state_dict(),
            "scheduler": {"kind": "warmup_cosine", "step": self.step},
            "rng": rng_state(),
            "data": {"seed": self.cfg.seed, "next_step": self.step},
            "run": self.cfg.to_dict(),
        }

    def save(self, metric: float | None) -> Path:
        """Write a checkpoint; with expert parallelism a collective, rank 0 writing."""
        model = to_dense_model(self.model) if self.ep > 1 else self.model
        if not self.is_main:
            return self.ckpt_dir / checkpoint_name(self.step)
        path = save_checkpoint(self.ckpt_dir, model, self.state(), self.step, metric)
        (path / "run.json").write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        tc = self.cfg.train
        prune_checkpoints(self.ckpt_dir, tc.keep_last, tc.keep_best)
        return path

    def restore(self, path: str | Path) -> Path:
        """Load weights and trainer state from a checkpoint (or a run dir's latest one)."""
        if self.ep > 1:
            raise ValueError("resuming is not supported with parallel.ep > 1")
        ckpt = pick_checkpoint(path, which="latest")
        state = torch.load(ckpt / STATE_FILE, map_location=self.device, weights_only=False)
        if state["optimizer"] is None:
            raise ValueError(f"{ckpt} was written with parallel.ep > 1 and cannot be resumed")
        load_model(self.model, str(ckpt / WEIGHTS_FILE), device=str(self.device))
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
            if self.ep > 1:
                self._signal_seen = signum  # every rank stops after the same step
            else:
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
            "params": self.params,
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
        return tc.batch_size * tc.grad_accum * self.cfg.task.seq_len * self.ep

    def _agree_on_stop(self) -> None:
        """Expert parallel: stop on every rank when any rank got a signal (a collective)."""
        if self.ep == 1:
            return
        flag = torch.tensor([self._signal_seen], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            self.stop_signal = int(flag.item())

    def close(self) -> None:
        """Leave the process group if this trainer created it."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    def fit(self, resume: str | Path | None = None) -> dict[str, Any]:
        """Train to cfg.train.steps (from a checkpoint when `resume`); returns a summary."""
        tc = self.cfg.train
        main = self.is_main
        if resume is not None:
            self.restore(resume)
        elif main and self.log.path.exists():
            self.log.path.unlink()  # a fresh run in an old directory starts a fresh log
        if main:
            self._write_run_info()
        view = LiveView(tc.steps, tc.live if main else "off", self.title)
        t0 = time.perf_counter()
        ckpt = None
        with self._stop_on_signals():
            while self.step < tc.steps and self.stop_signal is None:
                record = self.train_step()
                if main:
                    self.log.add_step(record)
                self.step += 1
                self._agree_on_stop()
                done = self.step == tc.steps
                if main and (self.step % tc.log_interval == 0 or done):
                    t0 = self._flush(view, t0)
                metric, slow = None, False
                if self.step % tc.eval_interval == 0 or done:
                    self.last_eval = self.evaluate()  # every rank: the forward is collective
                    if main:
                        self.log.add_eval(self.last_eval)
                        view.eval(self.step, self.last_eval)
                    metric, slow = self.last_eval[self.task.metric], True
                if self.step % tc.checkpoint_every == 0 or done:
                    ckpt, slow = self.save(metric), True
                if main and tc.plot_interval and self.step % tc.plot_interval == 0:
                    self.plot(final=False)
                    slow = True
                if slow:  # throughput counts training time only
                    t0 = time.perf_counter()
            if self.stop_signal is not None:
                if main:
                    self._flush(view, t0)
                ckpt = self.save(None)
        view.close()
        plots = self.plot(final=True) if self.stop_signal is None else []
        return self.summary(ckpt, plots)

    def plot(self, final: bool) -> list[Path]:
        """Dashboard (and the task's plots when final); rank 0 draws, all ranks must call."""
        from moekit.viz import plot_run

        model = to_dense_model(self.model) if final and self.ep > 1 else self.model
        if not self.is_main:
            return []
        paths = plot_run(self.run_dir)
        if final:
            paths += self.task.plots(model, self.run_dir / "plots")
        return paths

    def summary(self, ckpt: Path | None, plots: list[Path]) -> dict[str, Any]:
        ev = self.last_eval or {}
        return {
            "step": self.step,
            "stopped_by_signal": self.stop_signal,
            "val": {k: v for k, v in ev.items() if k not in ("step", "routing")},
            "routing": ev.get("routing", {}),
            "tokens_per_s": float(np.median(self.throughput)) if self.throughput else 0.0,
            "params": self.params,
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
