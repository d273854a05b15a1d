"""`moekit bench moe-vs-dense`: an MoE against dense models at equal training time.

From one run config (an MoE on the `text` task), three models train for the same wall-clock
budget each, per seed: the MoE; `dense-active`, a dense model whose FFN is the MoE's active
width (equal active parameters and FLOPs per token, `ModelConfig.dense_equivalent`); and
`dense-total`, a dense model whose FFN holds as many weights as all the experts. Each model's
LR schedule is sized to the budget from a short timed calibration (once per model), and
`train.time_budget_s` caps every run on the training clock (evaluation and the first,
compiling step not counted). The corpus is read once per seed and shared by its runs.

The report (`<out-dir>/moe-vs-dense-gpu.md` on CUDA, `-cpu` elsewhere, with its .json and
the validation loss against training time as .png) is rewritten after every run, so a run
stopped early keeps the runs it finished; `--no-train` redraws it from the run directories.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from moekit.bench.registry import bench_command, option, register_bench
from moekit.bench.report import Table, write_report
from moekit.bench.train_models import flops_per_token
from moekit.model import ModelConfig
from moekit.tasks import Task, build_task
from moekit.train.config import RunConfig
from moekit.train.parallelism import resolve_device
from moekit.train.rundir import claim_run_dir

MODELS = ("moe", "dense-active", "dense-total")
BENCH_FILE = "bench.json"  # per run directory: the calibrated rate and the run's wall-clock
FULL_MINUTES = 10.0  # per run, the budget the comparison is designed for
TARGET = 0.6  # the MoE should reach dense-active's final val loss within this share of its time


@dataclass
class MoEVsDenseBench:
    """MoE vs dense models at equal training time: validation loss against wall-clock."""

    config: str = option("configs/moe-vs-dense-gpu.yaml", "run config of the MoE (YAML)")
    device: str = option("", "cpu or cuda[:N] for every run ('' keeps the config's)")
    eager: bool = option(False, "no torch.compile, whatever the config says (short budgets)")
    minutes: float = option(10.0, "training minutes of every run")
    seeds: list[int] = option([0, 1], "seeds; every model trains once per seed")
    models: list[str] = option(list(MODELS), f"which models train, from {list(MODELS)}")
    calibrate_steps: int = option(40, "steps timed first (once per model) to size the schedule")
    evals: int = option(20, "evaluations per run (the points of the curves)")
    runs: str = option("runs/moe-vs-dense", "directory of the run directories")
    train: bool = option(True, "train the selected runs (--no-train: only report)")
    out_dir: str = option(
        "moekit-out/reports", "directory of the .md, .json and .png ('' writes none)"
    )

    def __post_init__(self) -> None:
        if not self.minutes > 0:
            raise ValueError(f"minutes={self.minutes} must be > 0")
        if self.device and not self.device.startswith(("cpu", "cuda")):
            raise ValueError(f"device={self.device!r} must be cpu, cuda[:N] or ''")
        bad = sorted(set(self.models) - set(MODELS))
        if bad or not self.models:
            raise ValueError(f"models={self.models} must be a non-empty subset of {list(MODELS)}")
        if not self.seeds:
            raise ValueError("seeds must hold at least one seed")
        for name in ("calibrate_steps", "evals"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def variant(model: ModelConfig, name: str) -> ModelConfig:
    """The MoE config itself, or the dense model of its active or of its total FFN width."""
    if name == "moe":
        return model
    if name == "dense-active":
        return model.dense_equivalent()
    m = model.moe
    if model.moe_every != 1:
        raise ValueError("dense-total needs model.moe_every=1 (every FFN an MoE)")
    width = (m.n_experts + m.n_shared_experts) * m.d_hidden
    return replace(model, moe_every=0, d_ff=width, activation=m.expert.activation)


def load_run_config(path: str | Path) -> RunConfig:
    """A run config from YAML (the file `moekit train CONFIG` reads)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    return RunConfig.from_dict(data)


def bench_run_config(opts: MoEVsDenseBench) -> RunConfig:
    """The run config with this bench's device and --eager applied."""
    base = load_run_config(opts.config)
    train: dict[str, Any] = {"device": opts.device} if opts.device else {}
    if opts.eager:  # each run compiles once: minutes of a budget of a few minutes
        train["compile"] = False
    return replace(base, train=replace(base.train, **train))


def _run_config(base: RunConfig, name: str, seed: int, out: Path, **train: Any) -> RunConfig:
    return replace(
        base,
        model=variant(base.model, name),
        train=replace(base.train, **train),
        seed=seed,
        out=str(out),
    )


def _sync_device(device: torch.device) -> None:
    """NOTE: host sync: wait for the device (timing only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrate(base: RunConfig, name: str, task: Task, steps: int, out: Path) -> float:
    """Training tokens/s of `name` over `steps` optimiser steps after a first (compiling) one;
    the trainer's own step, without its evaluation, checkpoints and plots."""
    from moekit.train import Trainer

    cfg = _run_config(base, name, task.seed, out, steps=steps + 1, live="off", time_budget_s=None)
    trainer = Trainer(cfg, task=task, title=f"{name} calibration")
    try:
        for step in range(steps + 1):
            if step == 1:
                _sync_device(trainer.device)
                start = time.perf_counter()
            trainer.step = step
            trainer.train_step()
        _sync_device(trainer.device)
        return steps * trainer.tokens_per_step / (time.perf_counter() - start)
    finally:
        trainer.close()
        shutil.rmtree(out, ignore_errors=True)


def train_one(opts: MoEVsDenseBench, base: RunConfig, name: str, task: Task, rate: float) -> Path:
    """Train `name` on `task` (its seed) for `opts.minutes` into runs/<name>-seed<seed>, its
    LR schedule sized from the calibrated tokens/s `rate`."""
    from moekit.train import Trainer
    from moekit.viz import plot_training

    start, seed = time.perf_counter(), task.seed
    tc = base.train
    per_step = tc.batch_size * tc.grad_accum * base.task.seq_len
    budget = opts.minutes * 60.0
    steps = max(opts.evals, math.ceil(budget * rate / per_step))  # the clock stops it on time
    every = max(1, steps // opts.evals)
    # the clock is read at log flushes: every ~1% of the run, so no run overshoots by much
    log = max(1, min(tc.log_interval, steps // 100))
    out = Path(opts.runs) / f"{name}-seed{seed}"
    cfg = _run_config(
        base, name, seed, out, steps=steps, eval_interval=every, ckpt_interval=steps,
        log_interval=log, plot_interval=0, time_budget_s=budget,
        warmup_steps=min(tc.warmup_steps, steps // 10),
    )  # fmt: skip
    claim_run_dir(out, None, overwrite=True)  # an earlier run there is moved aside, not mixed in
    trainer = Trainer(cfg, task=task, title=f"{name} seed {seed}", plotter=plot_training)
    try:
        trainer.fit()
    finally:
        trainer.close()
    info = {"calibrated_tokens_per_s": rate, "planned_steps": steps}
    info["wall_s"] = time.perf_counter() - start
    (out / BENCH_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out


def read_curve(run_dir: Path) -> dict[str, Any]:
    """A finished run's evaluation curve, (train_time_s, val_loss) pairs, with its run.json
    and the bench's record of it."""
    from moekit.train import read_log

    evals = [r for r in read_log(run_dir) if r.get("kind") == "eval" and "train_time_s" in r]
    info = json.loads((run_dir / "run.json").read_text())
    bench = run_dir / BENCH_FILE
    run = info["run"]
    return {
        "time_s": [r["train_time_s"] for r in evals],
        "val_loss": [r["val_loss"] for r in evals],
        "steps": evals[-1]["step"] if evals else 0,
        "tokens_per_step": run["train"]["batch_size"]
        * run["train"]["grad_accum"]
        * run["task"]["seq_len"],
        "params": info["params"],
        "model": info["model"],
        "bench": json.loads(bench.read_text()) if bench.exists() else {},
    }


def time_to_reach(curve: dict[str, Any], target: float) -> float | None:
    """First training time at which the curve's val loss is <= target, interpolated linearly
    between evaluations; None when it never gets there."""
    points = list(zip(curve["time_s"], curve["val_loss"], strict=True))
    for i, (t, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return t
            t0, l0 = points[i - 1]
            return t0 + (t - t0) * (l0 - target) / (l0 - loss)
    return None


def _plot(curves: dict[tuple[str, int], dict], path: Path, title: str) -> Path:
    from moekit.viz.figure import save_figure
    from moekit.viz.style import styled

    return save_figure(styled(_curves_figure)(curves, title), path)


def _curves_figure(curves: dict[tuple[str, int], dict], title: str) -> Any:
    from moekit.viz.style import figure_legend, new_figure

    fig, axes = new_figure(1, 1, panel=(7.0, 4.2), title=title)  # wide: a legend of 3 columns
    ax = axes.flat[0]
    colours = dict(zip(MODELS, ("tab:red", "tab:blue", "tab:green"), strict=True))
    styles = ("-", "--", ":", "-.")
    for (name, seed), c in sorted(curves.items(), key=_order):
        minutes = [t / 60 for t in c["time_s"]]
        style = styles[seed % len(styles)]
        ax.plot(minutes, c["val_loss"], style, color=colours[name], label=f"{name} seed {seed}")
    ax.set(title="validation loss", xlabel="training time (min)", ylabel="val loss (nats/byte)")
    figure_legend(fig, ax, ncol=3)
    return fig


def _order(item: tuple[tuple[str, int], Any]) -> tuple[int, int]:
    (name, seed), _ = item
    return MODELS.index(name), seed


def summarise(curves: dict[tuple[str, int], dict], seq_len: int) -> tuple[list[dict], list[str]]:
    """Rows of the final table, and the headline: how fast the MoE reaches dense-active's loss."""
    rows, lines, fractions = [], [], []
    for (name, seed), c in sorted(curves.items(), key=_order):
        cfg = ModelConfig.from_dict(c["model"])
        train_s = c["time_s"][-1] if c["time_s"] else None
        tokens = c["steps"] * c.get("tokens_per_step", 0)
        # the training clock starts after the first step, so it times the steps after it
        timed = (c["steps"] - 1) * c.get("tokens_per_step", 0)
        rows.append(
            {
                "model": name,
                "seed": seed,
                "total_params": c["params"]["total"],
                "active_params": c["params"]["active"],
                "flops_per_token": flops_per_token(cfg, seq_len),
                "steps": c["steps"],
                "tokens": tokens,
                "tokens_per_s": timed / train_s if train_s else None,
                "train_time_s": train_s,
                "final_val_loss": c["val_loss"][-1] if c["val_loss"] else None,
            }
        )
    for seed in sorted({s for _, s in curves}):
        moe, dense = curves.get(("moe", seed)), curves.get(("dense-active", seed))
        if not (moe and dense and dense["val_loss"] and moe["val_loss"]):
            continue
        target, dense_time = dense["val_loss"][-1], dense["time_s"][-1]
        reached = time_to_reach(moe, target)
        if reached is None:
            lines.append(
                f"seed {seed}: the MoE did not reach dense-active's final val loss {target:.4f} "
                f"(its own final: {moe['val_loss'][-1]:.4f})"
            )
            continue
        fractions.append(reached / dense_time)
        lines.append(
            f"seed {seed}: the MoE reached dense-active's final val loss {target:.4f} after "
            f"{reached / 60:.2f} min, {reached / dense_time:.2f}x of dense-active's "
            f"{dense_time / 60:.2f} min"
        )
    if fractions:
        lines.append(
            f"mean over seeds: {statistics.mean(fractions):.2f}x (target: <= {TARGET}x); a seed "
            "that did not get there is left out of the mean and named above"
        )
    return rows, lines


def verdict(rows: list[dict], curves: dict[tuple[str, int], dict]) -> list[str]:
    """Plain sentences from the numbers: which model ends lowest, by how much, and whether the
    MoE reached dense-active's final val loss within TARGET of dense-active's time."""
    finals: dict[str, list[float]] = {}
    for r in rows:
        if r["final_val_loss"] is not None:
            finals.setdefault(r["model"], []).append(r["final_val_loss"])
    if not finals:
        return []
    means = sorted((statistics.mean(v), name, len(v)) for name, v in finals.items())
    best, winner, n = means[0]
    others = ", ".join(
        f"{name} {loss:.4f} (+{loss - best:.4f}, +{100 * (loss - best) / best:.1f}%)"
        for loss, name, _ in means[1:]
    )
    seeds = f"{n} seed{'s' if n > 1 else ''}"
    lines = [
        f"Lowest final validation loss at equal training time: {winner}, {best:.4f} nats/byte "
        f"(mean of {seeds})" + (f"; {others}." if others else ".")
    ]
    per_seed = []
    for seed in sorted({s for _, s in curves}):
        moe, dense = curves.get(("moe", seed)), curves.get(("dense-active", seed))
        if moe and dense and moe["val_loss"] and dense["val_loss"]:
            reached = time_to_reach(moe, dense["val_loss"][-1])
            share = None if reached is None else reached / dense["time_s"][-1]
            per_seed.append((seed, share))
    if per_seed:
        ok = all(share is not None and share <= TARGET for _, share in per_seed)
        said = "; ".join(
            f"seed {s}: " + ("never" if share is None else f"{share:.2f}x") for s, share in per_seed
        )
        lines.append(
            f"Did the MoE reach dense-active's final val loss within {TARGET}x of dense-active's "
            f"training time (read from the curves, linear between evaluations)? "
            f"{'Yes' if ok else 'No'} ({said})."
        )
    return lines


def _table(rows: list[dict]) -> Table:
    columns = ("model", "seed", "params (total / active)", "GFLOP/token", "steps", "tokens")
    table = Table((*columns, "tokens/s", "train min", "final val loss (nats/byte)", "bits/byte"))
    for r in rows:
        loss, rate = r["final_val_loss"], r.get("tokens_per_s")
        table.rows.append(
            (
                r["model"],
                r["seed"],
                f"{r['total_params'] / 1e6:.1f}M / {r['active_params'] / 1e6:.1f}M",
                f"{r['flops_per_token'] / 1e9:.3f}",
                r["steps"],
                f"{r.get('tokens', 0) / 1e6:.2f}M",
                "" if rate is None else f"{rate:,.0f}",
                "" if r["train_time_s"] is None else f"{r['train_time_s'] / 60:.2f}",
                "" if loss is None else f"{loss:.4f}",
                "" if loss is None else f"{loss / math.log(2):.4f}",
            )
        )
    return table


def _budget(opts: MoEVsDenseBench, curves: dict[tuple[str, int], dict], wall_s: float) -> str:
    """What the runs cost: training clock per run and wall-clock with everything around it."""
    runs_wall = sum(c["bench"].get("wall_s", 0.0) for c in curves.values())
    line = (
        f"Budget: {len(curves)} runs of {opts.minutes:g} min on the training clock each "
        f"({len(curves) * opts.minutes:g} min); the runs took {runs_wall / 60:.1f} min of "
        "wall-clock with start-up, evaluations, checkpoints and plots"
    )
    if wall_s:
        line += (
            f", and this command {wall_s / 60:.1f} min with corpus loading and calibration "
            f"({opts.calibrate_steps} timed steps per model)"
        )
    line += "."
    if opts.minutes < FULL_MINUTES:
        line += (
            f" Scaled down: the comparison is meant to train {FULL_MINUTES:g} min per run; at "
            f"{opts.minutes:g} min the curves show early training only."
        )
    return line


def report(opts: MoEVsDenseBench, base: RunConfig, wall_s: float = 0.0) -> dict[str, Any]:
    """The report of every finished run under `opts.runs`, written to `opts.out_dir`."""
    curves = {}
    for name in MODELS:
        for seed in opts.seeds:
            run_dir = Path(opts.runs) / f"{name}-seed{seed}"
            if (run_dir / "run.json").exists():
                curves[(name, seed)] = read_curve(run_dir)
    rows, headline = summarise(curves, base.task.seq_len)
    device = resolve_device(base.train.device).type
    text = [
        f"Task {base.task.name} ({base.task.options}), sequences of {base.task.seq_len}; each "
        f"run trains {opts.minutes:g} min on the training clock (evaluation and the first, "
        "compiling step not counted), its LR schedule sized to that from the tokens/s of "
        f"{opts.calibrate_steps} timed steps of the same model. "
        "dense-active: the MoE's active FFN width (equal FLOPs per token); dense-total: the "
        "width of all its experts (equal parameters). Tokens/s: the tokens after the first "
        "step over the training clock.",
        _budget(opts, curves, wall_s),
    ]
    values = {f: getattr(opts, f) for f in opts.__dataclass_fields__}
    said = verdict(rows, curves)
    shown = {k: v for k, v in values.items() if k not in ("out_dir", "train")}
    result = write_report(
        "moe-vs-dense",
        "MoE vs dense at equal training time",
        bench_command("moe-vs-dense", **shown),
        [_table(rows)],
        {
            "runs": rows,  # not "rows": the curves PNG below is this report's chart
            "headline": headline,
            "verdict": said,
            "wall_s": wall_s or None,
            "curves": {f"{n}-seed{s}": c for (n, s), c in curves.items()},
        },
        config=opts,
        device=device,
        text=text,
        notes=[*said, *headline] or ["No seed has both an MoE and a dense-active run yet."],
        out_dir=None,
    )
    if opts.out_dir:
        stem = Path(opts.out_dir) / f"moe-vs-dense-{'gpu' if device == 'cuda' else device}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        markdown = result.pop("markdown")
        if curves:
            png = _plot(curves, stem.with_suffix(".png"), "MoE vs dense")
            markdown += f"\n![validation loss against training time]({png.name})\n"
            result["curves_png"] = str(png)
        stem.with_suffix(".md").write_text(markdown)
        result.pop("files")
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        result |= {
            "markdown": markdown,
            "files": [str(stem.with_suffix(s)) for s in (".md", ".json")],
        }
    return result


@register_bench("moe-vs-dense", MoEVsDenseBench)
def run(
    config: str = "configs/moe-vs-dense-gpu.yaml",
    device: str = "",
    eager: bool = False,
    minutes: float = 10.0,
    seeds: list[int] | tuple[int, ...] = (0, 1),
    models: list[str] | tuple[str, ...] = MODELS,
    calibrate_steps: int = 40,
    evals: int = 20,
    runs: str = "runs/moe-vs-dense",
    train: bool = True,
    out_dir: str | None = "moekit-out/reports",
) -> dict[str, Any]:
    """Trains the selected (model, seed) runs seed by seed and, after each, rewrites the report
    of every finished run under `runs` (with --no-train, only writes it)."""
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in locals().items()}
    start = time.perf_counter()
    opts = MoEVsDenseBench(**values)
    base = bench_run_config(opts)
    if base.model.moe_every == 0:
        raise ValueError(f"{config}: the run config must be an MoE (model.moe_every >= 1)")
    if not train:
        return report(opts, base)
    rates: dict[str, float] = {}
    root = Path(runs)
    for seed in seeds:
        task = build_task(base.task, seed)  # one corpus read per seed, shared by its runs
        for name in models:
            if name not in rates:  # throughput does not depend on the seed
                out = root / f"_calibrate-{name}"
                rates[name] = calibrate(base, name, task, calibrate_steps, out)
            train_one(opts, base, name, task, rates[name])
            result = report(opts, base, time.perf_counter() - start)
    return result
