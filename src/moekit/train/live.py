"""Progress display: a rich live view on a terminal, plain lines otherwise.

The view shows progress with ETA, the latest metrics and, per MoE layer, one bar per
expert whose height is that expert's share of the tokens (relative to a uniform share), the
load entropy, and a red line naming dead experts and collapsed layers (`train.health`).
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from moekit.train.health import health_line

_BARS = " ▁▂▃▄▅▆▇█"


def load_bars(load: list[float]) -> str:
    """Expert shares -> block characters; a full block is 2x the uniform share."""
    E = len(load)
    return "".join(_BARS[min(8, round(4 * share * E))] for share in load)


class LiveView:
    """`update` after each log flush, `eval` after each evaluation, `close` at the end."""

    def __init__(self, total: int, mode: str = "auto", title: str = "training") -> None:
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode, self.title, self.total = mode, title, total
        self.last: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.health: dict[str, Any] = {}  # dead experts / collapsed layers at the last flush
        self.live: Live | None = None
        if mode == "rich":
            self.progress = Progress(
                TextColumn(f"[bold]{title}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            self.task_id = self.progress.add_task(title, total=total, info="")
            self.live = Live(self._render(), console=Console(), refresh_per_second=4)
            self.live.start()

    def _render(self) -> Group:
        table = Table(show_header=True, header_style="bold", box=None)
        for col in ("metric", "value"):
            table.add_column(col)
        for key in ("loss", "task_loss", "aux_loss", "grad_norm", "tokens_per_s"):
            if key in self.last:
                table.add_row(key, f"{self.last[key]:.4g}")
        for key, value in self.last_eval.items():
            if isinstance(value, float):
                table.add_row(key if key.startswith("val") else f"val {key}", f"{value:.4g}")
        loads = Table(show_header=True, header_style="bold", box=None)
        loads.add_column("layer")
        loads.add_column("expert load (full bar = 2x uniform)")
        loads.add_column("dropped")
        loads.add_column("load entropy")
        loads.add_column("dead experts")
        dead = self.health.get("dead_experts", {})
        for layer, load in self.last.get("expert_load", {}).items():
            dropped = self.last.get("dropped_fraction", {}).get(layer, 0.0)
            entropy = self.last.get("load_entropy", {}).get(layer)
            loads.add_row(
                layer,
                load_bars(load),
                f"{dropped:.1%}",
                "" if entropy is None else f"{entropy:.2f}",
                ", ".join(map(str, dead.get(layer, []))),
            )
        alarm = health_line(self.health)
        parts = [self.progress, table, loads]
        if alarm:
            parts.append(Text(f"load health: {alarm}", style="bold red"))
        return Group(*parts)

    def update(self, step: int, record: dict[str, Any]) -> None:
        self.last = record
        self.health = record.get("health", self.health)
        if self.live is not None:
            info = f"loss {record['loss']:.4g}"
            self.progress.update(self.task_id, completed=step, info=info)
            self.live.update(self._render())
        elif self.mode == "plain":
            print(
                f"[{self.title}] step {step}/{self.total} loss {record['loss']:.4g} "
                f"aux {record['aux_loss']:.3g} lr {record['lr']['rest']:.2e} "
                f"gnorm {record['grad_norm']:.3g} tok/s {record['tokens_per_s']:.0f}",
                flush=True,
            )
            alarm = health_line(record.get("health", {}))
            if alarm:
                print(f"[{self.title}] load health at step {step}: {alarm}", flush=True)

    def eval(self, step: int, record: dict[str, Any]) -> None:
        self.last_eval = {k: v for k, v in record.items() if k not in ("step", "routing")}
        if self.live is not None:
            self.live.update(self._render())
        elif self.mode == "plain":
            parts = " ".join(f"{k} {v:.4g}" for k, v in self.last_eval.items())
            print(f"[{self.title}] eval step {step}: {parts}", flush=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
