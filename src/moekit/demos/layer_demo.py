"""`moekit layer-demo`: in a minute on a CPU, an MoE learns a regression of 4 input regimes.

Each regime is a cluster of inputs with its own target function, so a good router sends
each regime to its own experts. The demo trains, then reports per-expert load and the
regime -> expert routing purity, and saves a regime x expert heatmap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import Tensor, nn

from moekit.commands import command, option
from moekit.config import MoEConfig, RouterConfig
from moekit.layer import MoE, MoEInfo
from moekit.train.step import StepLoss, TrainStep

REGIMES = ("calm", "trending", "oscillating", "volatile")


@dataclass
class RegimeData:
    x: Tensor  # [N, d_in]
    y: Tensor  # [N, 1]
    regime: Tensor  # [N] int64


def make_regimes(n: int, d_in: int = 8, seed: int = 0, world: int = 0) -> RegimeData:
    """Four clusters of inputs, each with its own target function of x.

    `world` fixes the clusters (shared by train and validation); `seed` draws the samples.
    """
    centers = torch.randn(len(REGIMES), d_in, generator=torch.Generator().manual_seed(world)) * 3.0
    g = torch.Generator().manual_seed(seed + 1000)
    regime = torch.randint(0, len(REGIMES), (n,), generator=g)
    x = centers[regime] + torch.randn(n, d_in, generator=g)
    u = x - centers[regime]  # position inside the regime's cluster
    targets = torch.stack(
        [
            0.5 * u[:, 0],  # calm: gentle linear
            u[:, :3].sum(-1),  # trending: steep linear
            torch.sin(2.0 * u[:, 0]) + torch.cos(2.0 * u[:, 1]),  # oscillating
            u[:, 0] * u[:, 1] - u[:, 2].abs(),  # volatile: interactions
        ],
        dim=1,
    )
    return RegimeData(x=x, y=targets.gather(1, regime[:, None]), regime=regime)


class RegimeMoE(nn.Module):
    """Input projection -> MoE -> linear head."""

    def __init__(self, d_in: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, cfg.d_model)
        self.moe = MoE(cfg)
        self.head = nn.Linear(cfg.d_model, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, MoEInfo]:
        h = self.proj(x)
        y, info = self.moe(h)
        return self.head(h + y), info


def routing_counts(model: RegimeMoE, data: RegimeData, n_experts: int) -> Tensor:
    """[regimes, E] how often each regime's tokens pick each expert as their top choice."""
    with torch.no_grad():
        _, info = model(data.x)
    top = info.routing.weights.argmax(-1, keepdim=True)  # [N, 1] highest-weight slot
    expert = info.routing.experts.gather(1, top)[:, 0]  # [N], -1 if dropped
    kept = expert >= 0
    counts = torch.zeros(len(REGIMES), n_experts)
    counts.index_put_(
        (data.regime[kept], expert[kept]), torch.ones(int(kept.sum())), accumulate=True
    )
    return counts


def purity(counts: Tensor) -> float:
    """Share of tokens whose top expert is their regime's most-used top expert."""
    return float(counts.max(1).values.sum() / counts.sum().clamp_min(1))


def _sync_loss_text(loss: Tensor) -> str:
    """The progress bar's loss. NOTE: host sync, every 50 steps, for display only."""
    return f"loss {loss.item():.4f}"


@dataclass
class LayerDemo:
    """Where the heatmap goes, the seed and the training steps."""

    out: str = option("moekit-out", "directory for the heatmap")
    seed: int = option(0, "random seed")
    steps: int = option(600, "training steps")


@command(
    "layer-demo",
    LayerDemo,
    help="A bare MoE layer learns a 4-regime regression (< 1 min on a CPU); prints expert load "
    "and regime -> expert routing purity, writes a heatmap.",
)
def run_demo(options: LayerDemo | None = None, console: Console | None = None) -> dict:
    """Train, report, plot. Returns the numbers it printed."""
    from moekit.viz import plot_specialisation  # matplotlib: loaded by the commands that draw

    options, console = options or LayerDemo(), console or Console()
    seed, steps = options.seed, options.steps
    torch.manual_seed(seed)
    d_in, E = 8, 8
    cfg = MoEConfig(
        d_model=32,
        d_hidden=32,
        n_experts=E,
        k=2,
        router=RouterConfig(load_balance_weight=0.01),
    )
    model = RegimeMoE(d_in, cfg)
    train, val = make_regimes(8192, d_in, seed), make_regimes(2048, d_in, seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step = TrainStep(model)

    def forward(idx: Tensor) -> tuple[Tensor, MoEInfo]:
        return model(train.x[idx])

    def loss(out: tuple[Tensor, MoEInfo], idx: Tensor) -> StepLoss:
        pred, info = out
        return StepLoss(nn.functional.mse_loss(pred, train.y[idx]), info.aux_loss)

    start = time.perf_counter()
    columns = (
        TextColumn("[bold]training"),
        BarColumn(),
        TextColumn("{task.fields[loss]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=steps, loss="")
        for i in range(steps):
            idx = torch.randint(0, train.x.shape[0], (256,))  # [256] rows of this step
            record = step(opt, [idx], forward, loss)
            if i % 50 == 0 or i == steps - 1:
                progress.update(task, loss=_sync_loss_text(record["loss"]))
            progress.advance(task)
    elapsed = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        pred, info = model(val.x)
        val_mse = float(nn.functional.mse_loss(pred, val.y))
        baseline = float(val.y.var())
    counts = routing_counts(model, val, E)
    load = info.metrics["expert_load"]

    table = Table(
        title=f"expert load and regime routing (val MSE {val_mse:.4f} vs variance {baseline:.4f})"
    )
    table.add_column("regime")
    for e in range(E):
        table.add_column(f"e{e}", justify="right")
    table.add_column("top expert share", justify="right")
    for r, name in enumerate(REGIMES):
        share = counts[r] / counts[r].sum().clamp_min(1)
        table.add_row(name, *[f"{v:.2f}" for v in share.tolist()], f"{share.max():.2f}")
    table.add_row("[bold]load", *[f"{v:.2f}" for v in load.tolist()], "")
    console.print(table)
    heatmap = plot_specialisation(
        {"0": counts.tolist()},
        list(REGIMES),
        Path(options.out) / "regime_expert_heatmap.png",
        title="share of each regime's tokens by top expert",
    )
    result = {
        "val_mse": val_mse,
        "target_variance": baseline,
        "routing_purity": purity(counts),
        "train_seconds": elapsed,
        "expert_load": load.tolist(),
        "heatmap": str(heatmap),
    }
    console.print(f"routing purity {result['routing_purity']:.2f}; trained in {elapsed:.1f} s")
    console.print(f"heatmap: {heatmap}")
    return result
