"""`moekit sweep CONFIG`: short training runs over experts x k x capacity factor x router.

Every point of the grid is the run config with those four MoE settings replaced, trained
for `steps` steps into OUT/points/<id>/. Each finished point appends one line to
OUT/results.jsonl, so a sweep that stops (Ctrl-C, a crash) resumes where it was: a point
already there is not run again, and the point that was running is never recorded: the next
run trains it again, from its last checkpoint when it wrote one. The table (sweep.md,
sweep.json) and the trade-off plots (sweep.png: quality vs tokens/s, load balance vs
quality, dropped fraction vs capacity) are redrawn from results.jsonl at the end.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moekit.commands import argument, command, option
from moekit.progress import progress

RESULTS_FILE = "results.jsonl"
GRID_KEYS = ("experts", "k", "capacity_factor", "router")
DROPLESS = ("none", "null", "dropless")


def capacity_value(value: Any) -> float | None:
    """A capacity factor from a flag or YAML: a number, or none / null / dropless."""
    if value is None or (isinstance(value, str) and value.strip().lower() in DROPLESS):
        return None
    try:
        factor = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"capacity_factor={value!r} is not a number or none") from None
    if not factor > 0:
        raise ValueError(f"capacity_factor={value!r} must be > 0 (or none for dropless)")
    return factor


@dataclass
class SweepConfig:
    """The base run config, the grid (empty axis: the config's own value) and the budget."""

    config: str  # a run config YAML, as `moekit train` reads
    experts: list[int] = field(default_factory=list)
    k: list[int] = field(default_factory=list)
    capacity_factor: list[Any] = field(default_factory=list)  # numbers; none = dropless
    router: list[str] = field(default_factory=list)
    steps: int = 200  # training steps per point
    out: str = "moekit-out/sweep"
    live: str = "auto"  # progress bar: auto, rich, plain, off

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        for name in ("experts", "k"):
            if any(not isinstance(v, int) or v < 1 for v in getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)} must be integers >= 1")
        self.capacity_factor = [capacity_value(v) for v in self.capacity_factor]
        from moekit.routing import available_routers

        unknown = sorted(set(self.router) - set(available_routers()))
        if unknown:
            raise ValueError(f"router={self.router}: {unknown} not among {available_routers()}")

    @classmethod
    def with_grid(cls, grid_file: str | Path | None, **given: Any) -> SweepConfig:
        """The flags in `given`, each grid axis the flag's when given, else the YAML file's."""
        grid: dict[str, Any] = {}
        if grid_file:
            grid = yaml.safe_load(Path(grid_file).read_text()) or {}
            unknown = sorted(set(grid) - set(GRID_KEYS) - {"steps"})
            if not isinstance(grid, dict) or unknown:
                raise ValueError(f"{grid_file}: keys must be among {GRID_KEYS + ('steps',)}")
        for key, value in grid.items():
            if not given.get(key):
                given[key] = value if key == "steps" or isinstance(value, list) else [value]
        return cls(**{k: v for k, v in given.items() if v is not None})


@dataclass
class SweepOptions:
    """`moekit sweep`'s options: the axes as flags, or from a --grid YAML file."""

    config: str = argument("run config (YAML), as moekit train reads")
    grid: str | None = option(None, "YAML with the axes below")
    experts: list[int] = option([], "e.g. [4,8,16]")
    k: list[int] = option([], "e.g. [1,2]")
    capacity: list[float | str | None] = option([], "e.g. [1.0,1.25,none]")
    router: list[str] = option([], "e.g. [topk,sinkhorn]")
    steps: int | None = option(None, "steps per point (200)")
    out: str = option("moekit-out/sweep", "output directory")


@command(
    "sweep",
    SweepOptions,
    help="Short training runs over experts x k x capacity factor x router from a run config; "
    "a table and trade-off plots in --out. Finished points are not rerun.",
)
def sweep(opts: SweepOptions) -> None:
    given = dataclasses.asdict(opts)
    grid = given.pop("grid")
    given["capacity_factor"] = given.pop("capacity")
    for path in run_sweep(SweepConfig.with_grid(grid, **given))["files"].values():
        print(f"wrote {path}")


def base_config(path: str | Path) -> dict[str, Any]:
    """The run config of a YAML file as a plain dict (validated once here)."""
    from moekit.train.config import RunConfig

    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a run config (a YAML mapping of task, model, train)")
    return RunConfig.from_dict(data).to_dict()


def grid_points(cfg: SweepConfig, base: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the grid axes; an empty axis holds the base config's value."""
    moe = base["model"]["moe"]
    axes = {
        "experts": cfg.experts or [moe["n_experts"]],
        "k": cfg.k or [moe["k"]],
        "capacity_factor": cfg.capacity_factor or [moe["capacity_factor"]],
        "router": cfg.router or [moe["router"]["kind"]],
    }
    return [dict(zip(GRID_KEYS, combo, strict=True)) for combo in itertools.product(*axes.values())]


def point_id(point: dict[str, Any]) -> str:
    """A point's directory name, e.g. E8-k2-cf1.25-topk (cfnone: dropless)."""
    cf = "none" if point["capacity_factor"] is None else f"{point['capacity_factor']:g}"
    return f"E{point['experts']}-k{point['k']}-cf{cf}-{point['router']}"


def point_config(base: dict[str, Any], point: dict[str, Any], steps: int, out: Path) -> Any:
    """The base run config with the point's MoE settings, `steps` steps, into `out`."""
    from moekit.train.config import RunConfig

    data = json.loads(json.dumps(base))  # a deep copy of plain values
    moe = data["model"]["moe"]
    moe.update(n_experts=point["experts"], k=point["k"], capacity_factor=point["capacity_factor"])
    if moe["router"]["kind"] != point["router"]:  # the old kind's own options do not carry over
        moe["router"].update(kind=point["router"], options=None)
    train = data["train"]
    train.update(steps=steps, live="off", eval_interval=min(train["eval_interval"], steps))
    train["warmup_steps"] = min(train["warmup_steps"], steps // 2)
    data["out"] = str(out)
    return RunConfig.from_dict(data)


def _mean_last(train: list[dict[str, Any]], key: str, n: int = 10) -> float | None:
    """Mean over the last n logged steps and over layers of a per-layer metric."""
    values = [v for r in train[-n:] for v in r.get(key, {}).values()]
    return sum(values) / len(values) if values else None


def _imbalance(train: list[dict[str, Any]], n: int = 10) -> float | None:
    """Busiest expert's load over the uniform share (1 = balanced), last n steps, mean of layers."""
    loads = [load for r in train[-n:] for load in r.get("expert_load", {}).values()]
    return sum(max(load) * len(load) for load in loads) / len(loads) if loads else None


def _resumable(run_dir: Path, steps: int) -> bool:
    """Whether an interrupted point left a checkpoint short of its last step to resume from."""
    from moekit.model.store import list_checkpoints

    ckpts = list_checkpoints(run_dir / "checkpoints")
    return bool(ckpts) and ckpts[-1]["step"] < steps


def run_point(cfg: Any) -> dict[str, Any]:
    """Train one point (resumed when an interrupted run left checkpoints); its quality, speed,
    balance and drops. A Ctrl-C (or SIGTERM) stops it as KeyboardInterrupt: never a result.

    Points draw no plots of their own (the sweep's plots compare them); `moekit plot
    OUT/points/<id>` draws a point's dashboard and task plots when wanted.
    """
    from moekit.errors import CheckpointError
    from moekit.train.logging import read_log
    from moekit.train.trainer import Trainer

    class PointTrainer(Trainer):
        def plot(self, final: bool) -> list[Path]:
            return []

    run_dir = Path(cfg.out)
    resume = run_dir if _resumable(run_dir, cfg.train.steps) else None
    if resume is None:
        shutil.rmtree(run_dir, ignore_errors=True)  # a partial run without a checkpoint
    trainer = PointTrainer(cfg, title="sweep point")
    try:
        try:
            summary = trainer.fit(resume=resume)
        except CheckpointError:  # every checkpoint it left is damaged: train it afresh
            trainer.close()
            shutil.rmtree(run_dir, ignore_errors=True)
            trainer = PointTrainer(cfg, title="sweep point")
            summary = trainer.fit()
    finally:
        trainer.close()
    if summary["stopped_by_signal"]:
        raise KeyboardInterrupt(
            f"interrupted: sweep point {run_dir.name} stopped at step {summary['step']} of "
            f"{cfg.train.steps}; run the same command again to resume it"
        )
    train = [r for r in read_log(cfg.out) if r.get("kind") == "train"]
    metric = trainer.task.metric
    return {
        "metric": metric,
        "quality": summary["val"].get(metric),
        "val_loss": summary["val"].get("val_loss"),
        "tokens_per_s": summary["tokens_per_s"],
        "load_imbalance": _imbalance(train),
        "dropped_fraction": _mean_last(train, "dropped_fraction"),
        "params": summary["params"],
    }


def read_results(out: str | Path) -> dict[str, dict[str, Any]]:
    """Finished points by id; a line cut short by a kill is ignored (that point reruns)."""
    path = Path(out) / RESULTS_FILE
    done: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[record["id"]] = record
    return done


def run_sweep(cfg: SweepConfig) -> dict[str, Any]:
    """Run the points not yet in results.jsonl, then write the table and the plots."""
    base = base_config(cfg.config)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    points = grid_points(cfg, base)
    done = read_results(out)
    todo = [p for p in points if point_id(p) not in done]
    ran = []
    with progress("sweep", len(todo), cfg.live) as advance:
        for point in todo:
            pid = point_id(point)
            record: dict[str, Any] = {"id": pid, "point": point, "steps": cfg.steps}
            run_dir = out / "points" / pid
            try:
                point_cfg = point_config(base, point, cfg.steps, run_dir)
                record.update(run_point(point_cfg))
            except ValueError as err:  # a combination the config refuses, e.g. k > experts
                record["skipped"] = str(err)
            with (out / RESULTS_FILE).open("a") as f:
                f.write(json.dumps(record) + "\n")
            done[pid] = record
            ran.append(pid)
            shown = record.get("quality")
            advance(
                f"{pid}: " + ("skipped" if shown is None else f"{record['metric']} {shown:.4g}")
            )
    records = [done[point_id(p)] for p in points]
    files = write_sweep(records, out, cfg)
    return {
        "ran": ran,
        "reused": [point_id(p) for p in points if point_id(p) not in ran],
        "records": records,
        "files": files,
    }


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def write_sweep(records: list[dict[str, Any]], out: Path, cfg: SweepConfig) -> dict[str, str]:
    """sweep.md (table), sweep.json and sweep.png (trade-off plots); returns their paths."""
    from moekit.viz.sweep import plot_sweep

    metric = next((r["metric"] for r in records if "metric" in r), "quality")
    lines = [f"# Sweep of {cfg.config}, {cfg.steps} steps per point", ""]
    lines += [f"| point | {metric} | val loss | tokens/s | max load / uniform | dropped | note |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(
            f"| {r['id']} | {_cell(r.get('quality'), '.4g')} | {_cell(r.get('val_loss'), '.4g')} "
            f"| {_cell(r.get('tokens_per_s'), '.0f')} | {_cell(r.get('load_imbalance'), '.2f')} "
            f"| {_cell(r.get('dropped_fraction'), '.1%')} | {r.get('skipped', '')} |"
        )
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    config = {**dataclasses.asdict(cfg)}
    (out / "sweep.json").write_text(
        json.dumps({"config": config, "points": records}, indent=2) + "\n"
    )
    files = {"table": str(out / "sweep.md"), "json": str(out / "sweep.json")}
    finished = [r for r in records if r.get("quality") is not None]
    if finished:
        files["plots"] = str(plot_sweep(finished, out / "sweep.png", metric))
    print("\n".join(lines))
    return files
