"""`moekit profile CONFIG|CKPT`: one training step or one decode step of a model, by stage.

Runs the step under torch.profiler after a few untimed ones and writes to `out`:
  trace.json    Chrome / Perfetto trace (open in ui.perfetto.dev or chrome://tracing)
  stages.md     time per stage: attention, router, plan, experts, finish, aux, rest of the
  stages.json   forward, backward, optimizer, the rest of the step
  stages.png    the same as a bar chart: where the time goes
  memory        CUDA: peak allocated and memory_timeline.html; CPU: the process's peak RSS
Stages are the `moekit.ranges.stage` names in the layer and the model. `moekit bench
profile` is a different tool: per-kernel CUDA time of the Triton experts kernels alone.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.autograd.profiler_util import FunctionEvent

from moekit.commands import argument, command, option
from moekit.ranges import stage

MODES = ("train", "decode")
# (row, profiler range): the forward's stages, as the layer and the model name them
FORWARD_STAGES = (
    ("attention", "attention"),
    ("router", "moe.router"),
    ("plan", "moe.plan"),
    ("experts (gather, MLP, combine)", "moe.experts"),
    ("finish (shared, fallback)", "moe.finish"),
    ("aux losses and metrics", "moe.aux"),
)


@dataclass
class ProfileConfig:
    """What to profile and where the files go."""

    path: str = argument("run config (YAML) or checkpoint / run directory")
    # train: one optimiser step; decode: one cached decode position
    mode: str = option("train", f"one of {MODES}")
    device: str = option("cpu", "cpu or cuda[:N]")
    batch_size: int | None = option(None, "default: the config's")
    # None: seq_len - 1 - warmup
    context: int | None = option(None, "decode: prompt positions")
    warmup: int = option(2, "untimed steps first")  # allocator, caches, lazy init
    steps: int = option(1, "profiled steps (the table: per step)")
    out: str = option("moekit-out/profile", "output directory")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {MODES}")
        if not self.device.startswith(("cpu", "cuda")):
            raise ValueError(f"device={self.device!r} must be cpu or cuda[:N]")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.context is not None and self.context < 1:
            raise ValueError(f"context={self.context} must be >= 1")
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup} must be >= 0")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")


@command(
    "profile",
    ProfileConfig,
    help="Profile one training step or one decode step of a model by stage (router, plan, "
    "experts, finish, attention, backward, optimizer): a Chrome/Perfetto trace, a stage table "
    "and chart, memory. Per-kernel CUDA time of the Triton kernels alone is `moekit bench "
    "profile`.",
)
def profile(cfg: ProfileConfig) -> None:
    for path in profile_step(cfg)["files"].values():
        print(f"wrote {path}")


def load_target(path: str | Path, device: torch.device) -> tuple[Any, torch.nn.Module]:
    """(RunConfig, model): a YAML config builds a fresh model, a checkpoint loads its weights."""
    from moekit.model import Transformer
    from moekit.train.config import RunConfig
    from moekit.train.trainer import model_config_for

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such config, checkpoint or run directory")
    if path.is_dir():
        from moekit.model.store import load_files, pick_checkpoint
        from moekit.train.checkpoint import run_config_of

        ckpt = pick_checkpoint(path)
        return run_config_of(ckpt), load_files(ckpt, device)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a run config (a YAML mapping of task, model, train)")
    cfg = RunConfig.from_dict(data)
    from moekit.tasks import build_task

    torch.manual_seed(cfg.seed)
    model = Transformer(model_config_for(cfg.model, build_task(cfg.task, cfg.seed)))
    return cfg, model.to(device)


def _train_step(cfg: Any, model: torch.nn.Module, batch_size: int, device: torch.device):
    """A callable running one training step as `moekit train` does (TrainStep, AdamW)."""
    from moekit.tasks import build_task
    from moekit.train.metrics import model_loss
    from moekit.train.optim import build_optimizer
    from moekit.train.step import StepConfig, TrainStep, resolve_precision

    task = build_task(cfg.task, cfg.seed)
    batch = task.train_batch(0, 0, batch_size).to(device)
    optimizer = build_optimizer(model, cfg.train)
    precision = resolve_precision(cfg.train.precision, device)
    clip = cfg.train.grad_clip or None
    step = TrainStep(model, StepConfig(precision, clip, model.cfg.aux_loss_weight))

    def forward(b: Any) -> Any:
        with stage("forward"):
            return model(b.x, b.y)

    return lambda: step(optimizer, [batch], forward, model_loss)


def _decode_step(cfg: Any, model: torch.nn.Module, batch_size: int, context: int, device: Any):
    """A callable running one cached decode position after a `context`-position prefill."""
    from moekit.tasks import build_task

    task = build_task(cfg.task, cfg.seed)
    x = task.train_batch(0, 0, batch_size).x.to(device)  # [B, S] or [B, S, d_in]
    if context >= x.shape[1]:
        raise ValueError(f"context={context} must be < the task's seq_len={x.shape[1]}")
    model.eval()
    cache = model.new_cache()
    with torch.no_grad():
        model(x[:, :context], cache=cache)
    position = context

    @torch.no_grad()
    def step() -> None:
        nonlocal position
        with stage("forward"):
            model(x[:, position : position + 1], cache=cache)
        position = min(position + 1, x.shape[1] - 1)

    return step


def _top_level(events: list[FunctionEvent], prefix: str) -> list[FunctionEvent]:
    """Events named `prefix...` not nested in another such event."""
    hits = [e for e in events if e.name.startswith(prefix)]
    out = []
    for e in hits:
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith(prefix):
            parent = parent.cpu_parent
        if parent is None:
            out.append(e)
    return out


def stage_times(
    events: list[FunctionEvent], step_ms: float, device: bool = False, steps: int = 1
) -> list[dict]:
    """Rows (stage, ms per step, share of the step) from the profiled steps' events."""

    def ms(prefix: str) -> float:
        hits = _top_level(events, prefix)
        total = sum(e.device_time_total if device else e.cpu_time_total for e in hits)
        return total / 1e3 / steps

    forward = ms("forward")
    rows = [{"stage": label, "ms": ms(name)} for label, name in FORWARD_STAGES]
    named = sum(r["ms"] for r in rows)
    rows.append({"stage": "rest of the forward (embedding, norms, head)", "ms": forward - named})
    backward = ms("autograd::engine::evaluate_function")
    optimizer = ms("Optimizer.step#")
    if backward:
        rows.append({"stage": "backward", "ms": backward})
    if optimizer:
        rows.append({"stage": "optimizer", "ms": optimizer})
    rest = step_ms - forward - backward - optimizer
    rows.append({"stage": "rest of the step", "ms": max(rest, 0.0)})
    total = sum(r["ms"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["ms"] / total
    return rows


def _peak_rss_mib() -> float:
    """The process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _sync_cuda_peak_mib(device: torch.device) -> float:
    """Peak CUDA memory allocated during the profiled step. NOTE: host sync."""
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def profile_step(cfg: ProfileConfig) -> dict[str, Any]:
    """Profile one step; write trace, stage table and chart to cfg.out; return the results."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(cfg.device)
    run_cfg, model = load_target(cfg.path, device)
    batch = cfg.batch_size or run_cfg.train.batch_size
    if cfg.mode == "train":
        step: Callable[[], Any] = _train_step(run_cfg, model, batch, device)
    else:
        context = cfg.context or run_cfg.task.seq_len - 1 - cfg.warmup
        step = _decode_step(run_cfg, model, batch, max(1, context), device)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    for _ in range(cfg.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(
        activities=activities, profile_memory=cuda, record_shapes=cuda, with_stack=cuda
    ) as prof:
        start = time.perf_counter()
        for _ in range(cfg.steps):
            step()
        sync()
        step_ms = (time.perf_counter() - start) * 1e3 / cfg.steps
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / "trace.json"))
    events = list(prof.events())
    rows = stage_times(events, step_ms, steps=cfg.steps)
    memory: dict[str, Any] = {}
    if cuda:
        memory["cuda_peak_mib"] = _sync_cuda_peak_mib(device)
        per_device = stage_times(events, step_ms, device=True, steps=cfg.steps)
        for r, d in zip(rows, per_device, strict=True):
            r["device_ms"] = d["ms"]
        prof.export_memory_timeline(str(out / "memory_timeline.html"), device=str(device))
        memory["timeline"] = str(out / "memory_timeline.html")
    else:
        memory["peak_rss_mib"] = _peak_rss_mib()
    results = {
        "config": asdict(cfg),
        "model": {"params": model.num_params(), "moe_layers": model.moe_layers()},
        "batch_size": batch,
        "step_ms": step_ms,
        "stages": rows,
        "memory": memory,
        "files": {"trace": str(out / "trace.json")},
    }
    results["files"].update(_write(results, out))
    return results


def _write(results: dict[str, Any], out: Path) -> dict[str, str]:
    """stages.json, stages.md and stages.png; returns their paths."""
    from moekit.bench.charts import Chart, Panel, Series, draw_chart

    cfg, rows = results["config"], results["stages"]
    title = f"moekit profile: one {cfg['mode']} step of {Path(cfg['path']).name} ({cfg['device']})"
    lines = [
        f"# {title}",
        "",
        f"Step: {results['step_ms']:.2f} ms wall (mean of {cfg['steps']}, profiler on), "
        f"batch {results['batch_size']}. Times are per step; the rest of the step is the loss, "
        "clipping and bookkeeping (train), or what runs outside the forward (decode).",
        "",
    ]
    device = "device_ms" in rows[0]
    lines += [
        "| stage | CPU ms | share |" + (" device ms |" if device else ""),
        "|---|---|---|" + ("---|" if device else ""),
    ]
    for r in rows:
        cell = f" {r['device_ms']:.3f} |" if device else ""
        lines.append(f"| {r['stage']} | {r['ms']:.3f} | {r['share']:.1%} |{cell}")
    lines += [
        "",
        "Memory: "
        + ", ".join(
            f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in results["memory"].items()
        ),
    ]
    (out / "stages.md").write_text("\n".join(lines) + "\n")
    (out / "stages.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    names = [f"{r['stage'].split(' (')[0]} ({r['share']:.0%})" for r in rows]
    series = [Series("CPU", names, [r["ms"] for r in rows])]
    if device:
        series.append(Series("device", names, [r["device_ms"] for r in rows]))
    chart = Chart(
        title,
        [
            Panel(
                "where the time goes",
                series,
                "",
                "ms",
                kind="barh",
                note=f"step {results['step_ms']:.1f} ms wall, profiler on; share of the step",
            )
        ],
        panel_size=(7.5, 4.2),
    )
    png, _ = draw_chart(chart, out / "stages.png")
    print("\n".join(lines))
    return {"table": str(out / "stages.md"), "json": str(out / "stages.json"), "chart": str(png)}
