"""`moekit bench moe-vs-dense`: an MoE against dense models at equal training time.

From one run config (an MoE on the `text` task), three models train for the same wall-clock
budget each, per seed: the MoE; `dense-active`, a dense model whose FFN is the MoE's active
width (equal active parameters and FLOPs per token, `ModelConfig.dense_equivalent`); and
`dense-total`, a dense model whose FFN holds as many weights as all the experts. Each run's LR
schedule is sized to its budget from a short timed calibration run, and `train.time_budget_s`
caps it on the training clock (evaluation and the first, compiling step not counted).

The report: validation loss against training time (PNG), the final table, and how long the
MoE took to reach the final validation loss of `dense-active`, as a fraction of that model's
time. `--no-train` redraws the report from the run directories alone.
"""

from __future__ import annotations

import math
import shutil
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from moekit.bench.registry import bench_command, option, register_bench
from moekit.bench.report import DEFAULT_DIR, Table, write_report
from moekit.bench.train_models import flops_per_token
from moekit.model import ModelConfig
from moekit.train.config import RunConfig
from moekit.train.parallelism import resolve_device
from moekit.train.rundir import claim_run_dir

MODELS = ("moe", "dense-active", "dense-total")


@dataclass
class MoEVsDenseBench:
    """MoE vs dense models at equal training time: validation loss against wall-clock."""

    config: str = option("configs/moe-vs-dense-gpu.yaml", "run config of the MoE (YAML)")
    minutes: float = option(10.0, "training minutes of every run")
    seeds: list[int] = option([0, 1], "seeds; every model trains once per seed")
    models: list[str] = option(list(MODELS), f"which models train, from {list(MODELS)}")
    calibrate_steps: int = option(40, "steps timed first to size a run's LR schedule")
    evals: int = option(20, "evaluations per run (the points of the curves)")
    runs: str = option("runs/moe-vs-dense", "directory of the run directories")
    train: bool = option(True, "train the selected runs (--no-train: only report)")
    out_dir: str = option(DEFAULT_DIR, "directory of the .md, .json and .png ('' writes none)")

    def __post_init__(self) -> None:
        if not self.minutes > 0:
            raise ValueError(f"minutes={self.minutes} must be > 0")
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
    return RunConfig(**data)


def _run_config(base: RunConfig, name: str, seed: int, out: Path, **train: Any) -> RunConfig:
    return replace(
        base,
        model=variant(base.model, name),
        train=replace(base.train, **train),
        seed=seed,
        out=str(out),
    )


def _tokens_per_s(base: RunConfig, name: str, seed: int, steps: int, out: Path) -> float:
    """Median training tokens/s over a short run (its first, compiling step not counted)."""
    from moekit.train import Trainer

    log = max(1, steps // 5)
    cfg = _run_config(
        base, name, seed, out, steps=steps, log_interval=log, eval_interval=steps,
        ckpt_interval=steps, plot_interval=0, time_budget_s=None, live="off",
    )  # fmt: skip
    trainer = Trainer(cfg, title=f"{name} calibration")
    try:
        return trainer.fit()["tokens_per_s"]
    finally:
        trainer.close()
        shutil.rmtree(out, ignore_errors=True)


def train_one(opts: MoEVsDenseBench, base: RunConfig, name: str, seed: int) -> Path:
    """Calibrate, then train `name` for `opts.minutes` into runs/<name>-seed<seed>."""
    from moekit.train import Trainer

    root = Path(opts.runs)
    rate = _tokens_per_s(base, name, seed, opts.calibrate_steps, root / f"_calibrate-{name}")
    tc = base.train
    per_step = tc.batch_size * tc.grad_accum * base.task.seq_len
    budget = opts.minutes * 60.0
    steps = max(opts.evals, math.ceil(budget * rate / per_step))  # the clock stops it on time
    every = max(1, steps // opts.evals)
    out = root / f"{name}-seed{seed}"
    cfg = _run_config(
        base, name, seed, out, steps=steps, eval_interval=every, ckpt_interval=steps,
        plot_interval=0, time_budget_s=budget, warmup_steps=min(tc.warmup_steps, steps // 10),
    )  # fmt: skip
    claim_run_dir(out, None, overwrite=True)  # an earlier run there is moved aside, not mixed in
    trainer = Trainer(cfg, title=f"{name} seed {seed}")
    try:
        trainer.fit()
    finally:
        trainer.close()
    return out


def read_curve(run_dir: Path) -> dict[str, Any]:
    """A finished run's evaluation curve: (train_time_s, val_loss) pairs and its run.json."""
    import json

    from moekit.train import read_log

    evals = [r for r in read_log(run_dir) if r.get("kind") == "eval" and "train_time_s" in r]
    info = json.loads((run_dir / "run.json").read_text())
    return {
        "time_s": [r["train_time_s"] for r in evals],
        "val_loss": [r["val_loss"] for r in evals],
        "steps": evals[-1]["step"] if evals else 0,
        "params": info["params"],
        "model": info["model"],
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

    fig, axes = new_figure(1, 1, title=title)
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
        rows.append(
            {
                "model": name,
                "seed": seed,
                "total_params": c["params"]["total"],
                "active_params": c["params"]["active"],
                "flops_per_token": flops_per_token(cfg, seq_len),
                "steps": c["steps"],
                "train_time_s": c["time_s"][-1] if c["time_s"] else None,
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
            f"{reached / 60:.1f} min, {reached / dense_time:.2f}x of dense-active's "
            f"{dense_time / 60:.1f} min"
        )
    if fractions:
        lines.append(
            f"mean over seeds: {statistics.mean(fractions):.2f}x (target: <= 0.6x); a seed that "
            "did not get there is left out of the mean and named above"
        )
    return rows, lines


def _table(rows: list[dict]) -> Table:
    columns = ("model", "seed", "params (total / active)", "GFLOP/token", "steps")
    table = Table((*columns, "train min", "final val loss (nats/byte)", "bits/byte"))
    for r in rows:
        loss = r["final_val_loss"]
        table.rows.append(
            (
                r["model"],
                r["seed"],
                f"{r['total_params'] / 1e6:.1f}M / {r['active_params'] / 1e6:.1f}M",
                f"{r['flops_per_token'] / 1e9:.3f}",
                r["steps"],
                "" if r["train_time_s"] is None else f"{r['train_time_s'] / 60:.1f}",
                "" if loss is None else f"{loss:.4f}",
                "" if loss is None else f"{loss / math.log(2):.4f}",
            )
        )
    return table


@register_bench("moe-vs-dense", MoEVsDenseBench)
def run(
    config: str = "configs/moe-vs-dense-gpu.yaml",
    minutes: float = 10.0,
    seeds: list[int] | tuple[int, ...] = (0, 1),
    models: list[str] | tuple[str, ...] = MODELS,
    calibrate_steps: int = 40,
    evals: int = 20,
    runs: str = "runs/moe-vs-dense",
    train: bool = True,
    out_dir: str | None = DEFAULT_DIR,
) -> dict[str, Any]:
    """Trains the selected (model, seed) runs, then reports every finished run under `runs`."""
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in locals().items()}
    opts = MoEVsDenseBench(**values)
    base = load_run_config(config)
    if base.model.moe_every == 0:
        raise ValueError(f"{config}: the run config must be an MoE (model.moe_every >= 1)")
    if train:
        for seed in seeds:
            for name in models:
                train_one(opts, base, name, seed)
    curves = {}
    for name in MODELS:
        for seed in seeds:
            run_dir = Path(runs) / f"{name}-seed{seed}"
            if (run_dir / "run.json").exists():
                curves[(name, seed)] = read_curve(run_dir)
    rows, headline = summarise(curves, base.task.seq_len)
    text = [
        f"Task {base.task.name} ({base.task.options}), sequences of {base.task.seq_len}; each "
        f"run trains {minutes:g} min on the training clock (evaluation and the first, "
        "compiling step not counted), its LR schedule sized to that from a calibration run. "
        "dense-active: the MoE's active FFN width (equal FLOPs per token); dense-total: the "
        "width of all its experts (equal parameters).",
    ]
    shown = {k: v for k, v in values.items() if k not in ("out_dir", "train")}
    report = write_report(
        "moe-vs-dense",
        "MoE vs dense at equal training time",
        bench_command("moe-vs-dense", **shown),
        [_table(rows)],
        {
            "runs": rows,  # not "rows": the curves PNG below is this report's chart
            "headline": headline,
            "curves": {f"{n}-seed{s}": c for (n, s), c in curves.items()},
        },
        config=opts,
        device=resolve_device(base.train.device).type,
        text=text,
        notes=headline or ["No seed has both an MoE and a dense-active run yet."],
        out_dir=out_dir,
    )
    if out_dir and curves:
        md = Path(report["files"][0])
        png = _plot(curves, md.with_name(f"{md.stem}-curves.png"), "MoE vs dense")
        md.write_text(md.read_text() + f"\n![validation loss against training time]({png.name})\n")
        report["curves_png"] = str(png)
    return report
