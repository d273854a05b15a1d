"""`moekit runs list | show | latest`: the run directories under an output folder at a glance.

A run directory is one holding run.json, metrics.jsonl or checkpoints/. Its status: `running`
while a training process holds its lock, `finished` once its steps reached train.steps,
`interrupted` before that, `no checkpoints` when none was written.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moekit.commands import argument, command, group, option
from moekit.model.manifest import verify_manifest
from moekit.model.store import RUN_FILE, list_checkpoints
from moekit.train.logging import LOG_FILE, read_log
from moekit.train.rundir import is_locked

group("runs", "The runs under an output folder: their status, steps, best metric, checkpoints.")
DEFAULT_ROOT = "moekit-out"
LATEST = "latest"  # a run path given as this word means the newest run under moekit-out


@dataclass
class RunRow:
    """One run directory as `runs list` prints it."""

    name: str  # path relative to the root
    path: str
    status: str
    steps: int | None
    metric: str | None  # the task's validation metric (lower is better)
    best: float | None
    checkpoints: int
    size_bytes: int
    modified: float  # newest modification time of its files (seconds since the epoch)


def is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in (RUN_FILE, LOG_FILE, "checkpoints"))


def find_runs(root: str | Path) -> list[Path]:
    """Run directories at or under `root`, sorted by path; a run's own folders not entered."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such output folder (give one with --root)")
    found = []
    for here, dirs, _ in os.walk(root):
        if is_run_dir(Path(here)):
            found.append(Path(here))
            dirs.clear()
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found)


def _run_info(run_dir: Path) -> dict[str, Any]:
    """run.json as a dict ({} when missing or unreadable)."""
    try:
        info = json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _log(run_dir: Path) -> list[dict[str, Any]]:
    return read_log(run_dir) if (run_dir / LOG_FILE).is_file() else []


def _disk(run_dir: Path) -> tuple[int, float]:
    """Bytes of every file under run_dir and the newest modification time among them."""
    size, newest = 0, run_dir.stat().st_mtime
    for here, _, files in os.walk(run_dir):
        for name in files:
            try:
                st = os.stat(os.path.join(here, name))
            except OSError:  # removed meanwhile (a pruned checkpoint)
                continue
            size, newest = size + st.st_size, max(newest, st.st_mtime)
    return size, newest


def describe(run_dir: Path, root: Path) -> RunRow:
    """Status, steps, best metric, checkpoints and size of one run directory."""
    info, log = _run_info(run_dir), _log(run_dir)
    ckpts = list_checkpoints(run_dir / "checkpoints")
    steps = ckpts[-1]["step"] if ckpts else None
    logged = [r["step"] for r in log if isinstance(r.get("step"), int)]
    if logged:
        steps = max(logged) if steps is None else max(steps, max(logged))
    metric = info.get("metric")
    evals = [r[metric] for r in log if r.get("kind") == "eval" and _number(r.get(metric))]
    scored = [c["metric"] for c in ckpts if c["metric"] is not None]
    best = min(evals + scored) if evals + scored else None
    target = info.get("run", {}).get("train", {}).get("steps")
    if is_locked(run_dir):
        status = "running"
    elif not ckpts:
        status = "no checkpoints"
    elif isinstance(target, int) and ckpts[-1]["step"] >= target:
        status = "finished"
    else:
        status = "interrupted"
    size, modified = _disk(run_dir)
    name = "." if run_dir == root else str(run_dir.relative_to(root))
    return RunRow(name, str(run_dir), status, steps, metric, best, len(ckpts), size, modified)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def latest_run(root: str | Path = DEFAULT_ROOT) -> Path:
    """The most recently modified run directory under `root`."""
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(f"no run directory under {root}")
    return max(runs, key=lambda r: _disk(r)[1])


def resolve_run(path: str) -> str:
    """A run path as given, or the newest run under moekit-out for the word `latest`."""
    if path != LATEST or Path(path).exists():
        return path
    return str(latest_run(DEFAULT_ROOT))


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


@dataclass
class RunsList:
    root: str = option(DEFAULT_ROOT, "output folder searched for run directories")
    json: bool = option(False, "one JSON object per run instead of a table")


@command("runs list", RunsList, help="One row per run under --root: status, steps, best metric.")
def runs_list(args: RunsList) -> list[RunRow]:
    root = Path(args.root)
    rows = [describe(r, root) for r in find_runs(root)]
    if args.json:
        for row in rows:
            print(json.dumps(asdict(row)))
        return rows
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"runs under {root}")
    for col in ("run", "status", "steps", "best", "checkpoints", "size"):
        table.add_column(col, justify="left" if col in ("run", "status") else "right")
    for r in rows:
        best = "-" if r.best is None else f"{r.metric} {r.best:.4g}"
        steps = "-" if r.steps is None else str(r.steps)
        table.add_row(r.name, r.status, steps, best, str(r.checkpoints), _human(r.size_bytes))
    Console().print(table)
    return rows


@dataclass
class RunsShow:
    run: str = argument("run directory: a path, or its name under --root")
    root: str = option(DEFAULT_ROOT, "output folder the run name is looked up in")


def find_run(run: str, root: str) -> Path:
    """The run directory named `run` (a path, or relative to root); a ValueError otherwise."""
    if run == LATEST:
        return latest_run(root)
    for path in (Path(run), Path(root) / run):
        if path.is_dir() and is_run_dir(path):
            return path
    known = [str(r.relative_to(root)) for r in find_runs(root)] if Path(root).is_dir() else []
    raise ValueError(f"unknown run {run!r}: not a run directory; under {root}: {known or 'none'}")


@command("runs show", RunsShow, help="A run's config, last metrics and checkpoints.")
def runs_show(args: RunsShow) -> RunRow:
    run_dir = find_run(args.run, args.root)
    row = describe(run_dir, run_dir)
    info = _run_info(run_dir)
    print(f"run: {run_dir}")
    print(f"status: {row.status}, steps: {row.steps if row.steps is not None else '-'}")
    for line in _config_lines(info):
        print(line)
    log = _log(run_dir)
    for kind in ("train", "eval"):
        last = next((r for r in reversed(log) if r.get("kind") == kind), None)
        if last is not None:
            numbers = {k: v for k, v in last.items() if _number(v)}
            print(f"last {kind}: " + ", ".join(f"{k}={v:.4g}" for k, v in numbers.items()))
    print(f"checkpoints ({row.checkpoints}):")
    for c in list_checkpoints(run_dir / "checkpoints"):
        metric = "-" if c["metric"] is None else f"{c['metric']:.4g}"
        print(f"  {c['path'].name}  step {c['step']}  metric {metric}  {_intact(c['path'])}")
    return row


def _config_lines(info: dict[str, Any]) -> list[str]:
    """task, metric, params and the model/train settings a reader looks for first."""
    run, model = info.get("run", {}), info.get("model", {})
    train = run.get("train", {}) if isinstance(run, dict) else {}
    moe = model.get("moe") or {}
    parts = {
        "task": info.get("task"),
        "metric": info.get("metric"),
        "params": _params(info.get("params")),
        "d_model": model.get("d_model"),
        "n_layers": model.get("n_layers"),
        "experts": moe.get("n_experts") if isinstance(moe, dict) else None,
        "k": moe.get("k") if isinstance(moe, dict) else None,
        "steps": train.get("steps"),
        "batch_size": train.get("batch_size"),
        "lr": train.get("lr"),
    }
    given = {k: v for k, v in parts.items() if v is not None}
    return [f"config: {', '.join(f'{k}={v}' for k, v in given.items())}"] if given else []


def _params(params: Any) -> Any:
    """{'total': N, 'active': M} (run.json) -> 'N (M active)'; anything else as it is."""
    if isinstance(params, dict) and {"total", "active"} <= params.keys():
        return f"{params['total']} ({params['active']} active)"
    return params


def _intact(ckpt: Path) -> str:
    try:
        vouched = verify_manifest(ckpt)
    except ValueError as err:  # CheckpointError: names the damaged file
        return f"DAMAGED ({err})"
    return "intact" if vouched else "unverified (no manifest)"


@dataclass
class RunsLatest:
    root: str = option(DEFAULT_ROOT, "output folder searched for run directories")


@command(
    "runs latest",
    RunsLatest,
    help="Print the path of the most recently modified run: moekit eval $(moekit runs latest).",
)
def runs_latest(args: RunsLatest) -> Path:
    path = latest_run(args.root)
    print(path)
    return path
