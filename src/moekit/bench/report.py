"""The one writer of benchmark results: a Markdown table and a chart for people, JSON for programs.

Every file records the machine (CPU, cores, GPU name), the torch and triton versions, the
date and the command that reproduces it, so a number is never separated from its source.
The chart (PNG beside the .md) is the bench's own `Chart` or one drawn from its `rows`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moekit.bench.charts import Chart, auto_chart, draw_chart

DEFAULT_DIR = "moekit-out/benchmarks"  # under the output folder of the current directory


@dataclass
class Table:
    """One Markdown table: header cells and rows of already formatted cells."""

    columns: Sequence[str]
    rows: list[Sequence[Any]] = field(default_factory=list)
    title: str = ""  # a `## title` line above the table when set

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(f"rows[{i}] has {len(row)} cells for {len(self.columns)} columns")

    def markdown(self) -> list[str]:
        lines = [f"## {self.title}", ""] if self.title else []
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
        return lines


def _cpu_model() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU, cores, GPU name (None without CUDA), platform, Python, torch and triton versions."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cuda = torch.cuda.is_available()
    return {
        "cpu": _cpu_model(),
        "cores": cores,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "system": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
    }


def machine_slug(machine: dict[str, Any], device: str) -> str:
    """File-name part naming the hardware measured: the GPU for cuda, else CPU and cores."""
    name = machine["gpu"] if device.startswith("cuda") and machine["gpu"] else machine["cpu"]
    slug = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-") or "unknown"
    return slug if device.startswith("cuda") else f"{slug}-{machine['cores']}c"


def machine_line(machine: dict[str, Any]) -> str:
    gpu = machine["gpu"] or "none"
    return (
        f"Machine: {machine['cpu']}, {machine['cores']} cores; GPU: {gpu}; {machine['system']}; "
        f"Python {machine['python']}, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), triton {machine['triton'] or 'not installed'}."
    )


def _plain(config: Any) -> Any:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config


def write_report(
    name: str,
    title: str,
    command: str,
    tables: Sequence[Table],
    results: dict[str, Any],
    *,
    config: Any = None,
    device: str = "cpu",
    text: Sequence[str] = (),
    notes: Sequence[str] = (),
    out_dir: str | Path | None = DEFAULT_DIR,
    chart: Chart | None | bool = None,
) -> dict[str, Any]:
    """Writes `<out_dir>/<name>-<machine>-<date>.md`, `.json` and `.png`; returns the JSON content.

    `text` paragraphs go above the tables and `notes` below them. `chart`: the bench's own,
    None for one drawn from results["rows"] (when they have something to draw), False for
    none. The returned dict also holds `files` (.md and .json; empty when out_dir is None
    or "") and `markdown`; `chart` (when drawn) holds the PNG's path and panel titles.
    """
    machine, date = machine_info(), dt.date.today().isoformat()
    report = {
        "title": title,
        "date": date,
        "command": command,
        "machine": machine,
        "config": _plain(config),
        **results,
    }
    if chart is None:
        chart = auto_chart(results, title)
    stem = Path(out_dir or ".") / f"{name}-{machine_slug(machine, device)}-{date}"
    png = None
    if out_dir and chart:
        stem.parent.mkdir(parents=True, exist_ok=True)
        png, panels = draw_chart(chart, stem.with_suffix(".png"))
        report["chart"] = {"file": str(png), "panels": panels}
    lines = [f"# {title}, {date}", "", f"Command: `{command}`  ", machine_line(machine), ""]
    for paragraph in text:
        lines += [paragraph, ""]
    for table in tables:
        lines += [*table.markdown(), ""]
    if png is not None:
        lines += [f"![{title}]({png.name})", ""]
    for paragraph in notes:
        lines += [paragraph, ""]
    markdown = "\n".join(lines)
    files: list[str] = []
    if out_dir:
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        stem.with_suffix(".md").write_text(markdown)
        files = [str(stem.with_suffix(".md")), str(stem.with_suffix(".json"))]
    return {**report, "files": files, "markdown": markdown}
