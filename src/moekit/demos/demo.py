"""`moekit demo`: an MoE transformer vs a dense one of equal active size, on `signals`.

Both train for the same steps on the same data. The demo prints their validation loss,
parameter counts and throughput, which experts each signal family is routed to, and the
paths of the dashboard, specialisation heatmap and checkpoint it wrote. A Ctrl-C stops the
model training and the demo with it: no comparison is drawn from a run cut short.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from moekit.commands import command, option
from moekit.config import MoEConfig, RouterConfig
from moekit.model import ModelConfig
from moekit.model.task import TaskConfig
from moekit.tasks.signals import CATEGORIES
from moekit.train.config import RunConfig, TrainConfig
from moekit.train.trainer import Trainer


@dataclass
class Demo:
    """Where the outputs go, the seed and how long each model trains."""

    out: str = option("moekit-out", "directory for plots and outputs")
    seed: int = option(0, "random seed")
    steps: int = option(1500, "training steps of each model")


def demo_config(out: str, seed: int = 0, steps: int = 1500) -> RunConfig:
    """Small enough that both models train in under a minute on two idle CPU cores."""
    moe = MoEConfig(
        d_model=48,
        d_hidden=64,
        n_experts=8,
        k=2,
        router=RouterConfig(load_balance_weight=0.01, z_loss_weight=1e-3),
    )
    return RunConfig(
        task=TaskConfig(name="signals", seq_len=32, val_sequences=256),
        model=ModelConfig(d_model=48, n_layers=2, n_heads=4, max_seq_len=32, moe=moe),
        train=TrainConfig(
            steps=steps,
            batch_size=16,
            lr=4e-3,
            warmup_steps=20,
            eval_interval=max(1, steps // 4),
            log_interval=10,
            threads=1,  # tiny matrices: one thread beats two contending ones
        ),
        seed=seed,
        out=out,
    )


def routing_table(routing: dict[str, list[list[float]]], categories: list[str]) -> Table:
    """Category -> the expert taking the largest share of its tokens, per MoE layer."""
    from moekit.viz import category_shares  # matplotlib: loaded by the commands that draw

    table = Table(title="routing: top expert per signal family (share of its token-slots)")
    table.add_column("category")
    layers = sorted(routing, key=int)
    for layer in layers:
        table.add_column(f"layer {layer}")
    shares = {layer: category_shares(routing[layer]) for layer in layers}
    for c, name in enumerate(categories):
        cells = []
        for layer in layers:
            row = shares[layer][c]
            top = np.argsort(row)[::-1][:2]
            cells.append(", ".join(f"e{e} {row[e]:.0%}" for e in top))
        table.add_row(name, *cells)
    return table


@command(
    "demo",
    Demo,
    help="Train a small MoE transformer and a dense one of equal active size on `signals` "
    "(CPU, under a minute on an idle 2-core machine) and show what the experts learned.",
)
def run_demo(options: Demo | None = None) -> dict:
    """Train both models, print the comparison, return both summaries."""
    from moekit.viz import plot_training

    options, console = options or Demo(), Console()
    out, seed, steps = Path(options.out), options.seed, options.steps
    moe_cfg = demo_config(str(out / "moe"), seed, steps)
    dense_cfg = replace(moe_cfg, model=moe_cfg.model.dense_equivalent(), out=str(out / "dense"))
    results: dict[str, Any] = {}
    for name, cfg in (("MoE 8x top-2", moe_cfg), ("dense (same active)", dense_cfg)):
        console.print(f"[bold]training {name} on signals for {steps} steps[/bold]")
        results[name] = Trainer(cfg, title=name, plotter=plot_training).fit()
        if results[name]["stopped_by_signal"]:
            raise KeyboardInterrupt(
                f"interrupted: {name} stopped at step {results[name]['step']} of {steps} "
                f"(checkpoint {results[name]['checkpoint']}); the demo compares finished runs only"
            )
    table = Table(title=f"signals, {steps} steps, batch 16 x 32 positions, seed {seed}")
    for col in ("model", "val MSE", "total params", "active params", "tokens/s"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name, r in results.items():
        p = r["params"]
        row = (f"{r['val']['mse']:.5f}", f"{p['total']:,}", f"{p['active']:,}")
        table.add_row(name, *row, f"{r['tokens_per_s']:,.0f}")
    console.print(table)
    moe = results["MoE 8x top-2"]
    console.print(routing_table(moe["routing"], list(CATEGORIES)))
    console.print("[bold]wrote[/bold]")
    for path in [*moe["plots"], results["dense (same active)"]["plots"][0], moe["checkpoint"]]:
        console.print(f"  {path}")
    return results
