"""`Trainer`: the training loop, evaluation, checkpoints, resume and graceful stop.

Data for step s is `task.train_batch(s, micro)` and the LR is a function of s, so resuming
from a checkpoint (weights, optimizer, scaler, RNG states, step) reproduces the loss curve
of an uninterrupted run exactly on CPU in fp32. SIGINT / SIGTERM finish the current step,
write a checkpoint and return normally.

The pieces are their own objects: `TrainStep` (forward, precision, accumulation, clipping),
the parallelism (`train.parallelism`, chosen once from `cfg.parallel`) and the
`Checkpointer`. With `parallel.ep = N > 1` (one process per rank, started by torchrun)
`train.batch_size` is per rank: the step's global batch is
`task.train_batch(s, micro, N * batch_size)` and rank r trains on rows
[r * batch_size, (r + 1) * batch_size). Gradients are averaged over ranks and clipped by the
whole model's norm; rank 0 alone logs, plots and writes checkpoints, which hold the dense
model (`moekit.load` reads them). Logged step metrics are rank 0's; evaluation runs the full
validation set on every rank; ranks agree on a stop signal every `log_interval` steps.
Checkpoints hold the single-process optimizer state (expert moments gathered), so a run
resumes bitwise at the same size and also at any other `parallel.ep`.

For runs at size: `train.activation_checkpointing` (`moekit.train.recompute`), `train.compile`,
AdamW fused on CUDA, batches built ahead in pinned memory (`moekit.train.data`), and
`train.time_budget_s`, which stops on the training clock (`moekit.train.clock`; evaluation
and the first step, where compilation happens, are not counted; evaluation records carry it
as `train_time_s`). Router schedules are set before every step and dead experts / collapsed
layers (`moekit.train.health`) are reported at every log flush. Figures are drawn by the
`plotter` its caller passes in (`moekit.viz.plot_training`); without one, none.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moekit.model import ModelConfig, ModelOutput, Transformer
from moekit.model.store import RUN_FILE
from moekit.model.task import Batch, Task
from moekit.tasks import build_task
from moekit.train.checkpoint import Checkpointer
from moekit.train.clock import TrainClock
from moekit.train.config import RunConfig
from moekit.train.data import Prefetcher
from moekit.train.health import LoadHealth
from moekit.train.live import LiveView
from moekit.train.logging import RunLog, peak_memory_mib
from moekit.train.metrics import evaluate_model, model_loss
from moekit.train.optim import build_optimizer, set_lr
from moekit.train.parallelism import build_parallelism, resolve_device
from moekit.train.recompute import checkpoint_activations
from moekit.train.rng import rng_state, seed_everything, set_rng_state
from moekit.train.schedules import RouterSchedules
from moekit.train.step import StepConfig, TrainStep, resolve_precision

# draws a run's figures into run_dir/plots: (run_dir, task, the dense model at the end, else None)
Plotter = Callable[[Path, Task, nn.Module | None], list[Path]]


def model_config_for(cfg: ModelConfig, task: Task) -> ModelConfig:
    """The run's model config with the task's input/output sizes filled in."""
    fields = task.model_fields()
    for name, value in fields.items():
        given = getattr(cfg, name)
        if given is not None and given != value:
            raise ValueError(f"model.{name}={given} conflicts with task {task.name} ({value})")
    return replace(cfg, **fields)


class Trainer:
    """Trains `cfg.model` on `cfg.task`; everything goes into the run directory `cfg.out`."""

    def __init__(
        self,
        cfg: RunConfig,
        task: Task | None = None,
        title: str = "training",
        plotter: Plotter | None = None,
    ) -> None:
        self.cfg, self.title, self.plotter = cfg, title, plotter
        tc = cfg.train
        self.run_dir = Path(cfg.out)
        self.parallel = build_parallelism(cfg.parallel, resolve_device(tc.device))
        self.device = self.parallel.device
        self.is_main = self.parallel.is_main
        if tc.time_budget_s is not None and self.parallel.world > 1:
            raise ValueError("train.time_budget_s needs one process (the ranks' clocks differ)")
        seed_everything(cfg.seed)  # the same seed on every rank: identical initial weights
        self.task = task or build_task(cfg.task, cfg.seed)
        if tc.threads is not None:
            torch.set_num_threads(tc.threads)
        model = Transformer(model_config_for(cfg.model, self.task)).to(self.device)
        self.params = model.num_params()  # of the whole model, before any sharding
        checkpoint_activations(model, tc.activation_checkpointing)
        self.model = self.parallel.shard(model)
        self.optimizer = build_optimizer(self.model, tc)
        self.forward_model = self.parallel.wrap(self.model)
        if tc.compile:  # the training forward only: evaluation runs the model as it is
            self.forward_model = torch.compile(self.forward_model)
        self.schedules = RouterSchedules(self.model)
        self.health = LoadHealth(tc.health)
        self.batches = Prefetcher(self._step_batches, self.device, tc.prefetch)
        self.clock = TrainClock(self.device)
        step_cfg = StepConfig(
            precision=resolve_precision(tc.precision, self.device),
            max_grad_norm=tc.grad_clip if tc.grad_clip > 0 else math.inf,  # 0: measure only
            aux_weight=model.cfg.aux_loss_weight,
        )
        self.step_fn = TrainStep(self.model, step_cfg, self.parallel)
        self.checkpointer = Checkpointer(
            self.run_dir / "checkpoints", cfg.to_dict(), tc.keep_last, tc.keep_best, self.parallel
        )
        self.step = 0
        self.log = RunLog(self.run_dir, finish=self.health.finish)
        self.val = [b.to(self.device) for b in self.task.val_batches(tc.eval_batch_size)]
        self.stop_signal: int | None = None
        self._signal_seen = 0  # a signal this rank got; the ranks agree on it in the loop
        self.last_eval: dict[str, Any] | None = None
        self.throughput: list[float] = []

    @property
    def scaler(self) -> torch.amp.GradScaler:
        return self.step_fn.scaler

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.step_fn.autocast()

    # one optimiser step ---------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """Forward/backward over grad_accum micro-batches, clip, step. Returns device tensors."""
        lrs = set_lr(self.optimizer, self.step, self.cfg.train)
        scheduled = self.schedules(self.step)
        batches = self.batches.get(self.step)
        record = self.step_fn(self.optimizer, batches, self._forward, model_loss)
        self.optimizer.zero_grad(set_to_none=True)  # no gradient memory held through evaluation
        grad_norm = record.pop("grad_norm")
        if "expert_load" in record:
            record["load_entropy"] = self.health.update(record["expert_load"])
        if scheduled:
            record["schedules"] = scheduled
        return {"step": self.step + 1, **record, "lr": lrs, "grad_norm": grad_norm}

    def _forward(self, batch: Batch) -> ModelOutput:
        return self.forward_model(batch.x, batch.y)

    def _step_batches(self, step: int) -> list[Batch]:
        """This rank's micro-batches of `step` on the host: its slices of the global batches."""
        return [self._train_batch(step, m) for m in range(self.cfg.train.grad_accum)]

    def _train_batch(self, step: int, micro: int) -> Batch:
        B, world = self.cfg.train.batch_size, self.parallel.world
        batch = self.task.train_batch(step, micro, B * world)
        if world > 1:
            rows = self.parallel.local_rows(B)
            batch = Batch(batch.x[rows], batch.y[rows], batch.category[rows])
        return batch

    # evaluation -----------------------------------------------------------------------------
    def evaluate(self, batches: list[Batch] | None = None) -> dict[str, Any]:
        """Validation loss, task metrics and category x expert counts per MoE layer."""
        record = evaluate_model(self.model, self.task, batches or self.val, self.autocast)
        return {"step": self.step, "train_time_s": self.clock._sync_read(), **record}

    # checkpoints ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything but the weights a resume needs: tensors and plain values only."""
        return {
            "step": self.step,
            # the single-process state (expert moments gathered): resumes at any parallel.ep
            "optimizer": self.parallel.optimizer_state(self.model, self.optimizer),
            "scaler": self.scaler.state_dict(),
            "scheduler": {"kind": "warmup_cosine", "step": self.step},
            "rng": rng_state(),
            "train_time_s": self.clock._sync_read(),
            "data": {"seed": self.cfg.seed, "next_step": self.step},
            "run": self.cfg.to_dict(),
        }

    def save(self, metric: float | None) -> Path:
        """Write a checkpoint; with expert parallelism a collective, rank 0 writing."""
        return self.checkpointer.save(self.model, self.state(), self.step, metric)

    def restore(self, path: str | Path) -> Path:
        """Load weights and trainer state from a checkpoint (or a run dir's latest one)."""
        ckpt, state = self.checkpointer.restore(path, self.model, self.device)
        self.parallel.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.clock.total = state.get("train_time_s", 0.0)
        set_rng_state(state["rng"])
        if self.is_main:  # rank 0 alone writes the log
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
            self._signal_seen = signum
            if self.parallel.world == 1:  # nothing to agree on: stop after the current step
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
        records[-1]["health"] = self.health.snapshot()  # read in the flush's one transfer
        elapsed = max(time.perf_counter() - t0, 1e-9)  # training time since the last flush
        rate = len(records) * self.tokens_per_step / elapsed
        step_ms = 1e3 * elapsed / len(records)
        peak = peak_memory_mib(self.device)
        for rec in records:
            rec.update(tokens_per_s=rate, step_ms=step_ms, peak_mem_mib=peak)
        self.throughput.append(rate)
        synced = self.log.flush()
        if synced:
            view.update(self.step, synced[-1])
        return time.perf_counter()

    @property
    def tokens_per_step(self) -> int:
        tc = self.cfg.train
        return tc.batch_size * tc.grad_accum * self.cfg.task.seq_len * self.parallel.world

    def _check_stop(self, done: bool) -> None:
        """Act on a signal: at once in one process; every log_interval (and at the end) when
        the ranks must agree, since agreeing is a collective."""
        if self.parallel.world == 1 or done or self.step % self.cfg.train.log_interval == 0:
            self.stop_signal = self.parallel._sync_agree_on_stop(self._signal_seen)

    def _out_of_time(self) -> bool:
        """Whether train.time_budget_s is spent; read at log flushes, which sync anyway."""
        tc = self.cfg.train
        if tc.time_budget_s is None or self.step % tc.log_interval:
            return False
        return self.clock._sync_read() >= tc.time_budget_s

    def _slow_work_due(self, done: bool) -> bool:
        """Whether evaluation, a checkpoint or a plot comes after this step."""
        tc = self.cfg.train
        plot = self.is_main and tc.plot_interval and self.step % tc.plot_interval == 0
        return (
            done
            or not self.step % tc.eval_interval
            or not self.step % tc.checkpoint_every
            or bool(plot)
        )

    def close(self) -> None:
        """Leave the process group if this trainer created it; stop building batches."""
        self.batches.close()
        self.parallel.close()

    def fit(self, resume: str | Path | None = None) -> dict[str, Any]:
        """Train to cfg.train.steps (from a checkpoint when `resume`); returns a summary."""
        tc = self.cfg.train
        main = self.is_main
        if resume is not None:
            ckpt = self.restore(resume)
            if self.step >= tc.steps:  # nothing to train: say so instead of a run with no output
                raise ValueError(
                    f"train.steps={tc.steps}, but {ckpt} is already at step {self.step}: "
                    "raise train.steps to continue the run"
                )
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
                if not self.clock.running:  # from the end of the first step (compilation)
                    self.clock._sync_resume()
                if main:
                    self.log.add_step(record)
                self.step += 1
                done = self.step == tc.steps or self._out_of_time()
                self._check_stop(done)
                if main and (self.step % tc.log_interval == 0 or done):
                    t0 = self._flush(view, t0)
                metric, slow = None, False
                if self._slow_work_due(done):
                    self.clock._sync_pause()  # the clock counts training only
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
                self.clock.resume()
                if done:  # the step count, or train.time_budget_s
                    break
            if self.stop_signal is not None:
                if main:
                    self._flush(view, t0)
                ckpt = self.save(None)
        self.clock._sync_pause()
        self.batches.close()
        view.close()
        plots = self.plot(final=True) if self.stop_signal is None else []
        return self.summary(ckpt, plots)

    def plot(self, final: bool) -> list[Path]:
        """What `plotter` draws (given the dense model when final); rank 0 draws, all ranks
        must call."""
        if self.plotter is None:
            return []
        model = self.parallel.dense(self.model) if final else None  # collective when sharded
        if not self.is_main:
            return []
        return self.plotter(self.run_dir, self.task, model)

    def summary(self, ckpt: Path | None, plots: list[Path]) -> dict[str, Any]:
        ev = self.last_eval or {}
        return {
            "step": self.step,
            "stopped_by_signal": self.stop_signal,
            "val": {k: v for k, v in ev.items() if k not in ("step", "routing")},
            "routing": ev.get("routing", {}),
            "tokens_per_s": float(np.median(self.throughput)) if self.throughput else 0.0,
            "train_time_s": self.clock.total,
            "params": self.params,
            "checkpoint": ckpt,
            "plots": plots,
        }
