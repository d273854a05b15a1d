"""`moekit bench system`: what `moekit.System`'s switches cost and buy in training.

Each variant is a fresh System (the same seed, sizes and data) with some of its three
switches on: compile (`torch.compile`), AMP (bf16 autocast) and checkpointing (each MoE
block recomputed in backward). Per variant: training tokens/s (median and min-max over the
timed steps), the first step's time (compilation lands there) and memory: on CUDA the peak
allocated during a step, everywhere the activations one forward keeps for backward.

    moekit bench system --device cuda --d-model 1024 --seq 1024   # GPU
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moekit.bench.charts import Chart, Panel, Series
from moekit.bench.layer import saved_mib
from moekit.bench.registry import bench_command, option, register_bench
from moekit.bench.report import DEFAULT_DIR, Table, write_report
from moekit.bench.timing import spread_ms
from moekit.progress import progress

# variant -> SystemConfig switches
VARIANTS: dict[str, dict[str, Any]] = {
    "eager": {},
    "amp": {"amp_dtype": "bf16"},
    "checkpointing": {"checkpointing": True},
    "compile": {"compile": True},
    "compile+amp+checkpointing": {"compile": True, "amp_dtype": "bf16", "checkpointing": True},
}


@dataclass
class SystemBench:
    """moekit.System's compile / AMP / checkpointing switches: training throughput and memory."""

    device: str = option("cpu", "cpu or cuda[:N]")
    variants: list[str] = option(list(VARIANTS), f"switch sets, from {list(VARIANTS)}")
    d_model: int = option(128, "model width D")
    n_layers: int = option(2, "residual MoE blocks")
    n_experts: int = option(8, "experts per layer")
    k: int = option(2, "experts per token")
    batch: int = option(8, "sequences per step")
    seq: int = option(128, "positions per sequence")
    steps: int = option(10, "timed training steps per variant (after 2 untimed)")
    out_dir: str = option(DEFAULT_DIR, "directory of the .md, .json and .png ('' writes none)")

    def __post_init__(self) -> None:
        if not self.device.startswith(("cpu", "cuda")):
            raise ValueError(f"device={self.device!r} must be cpu or cuda[:N]")
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown or not self.variants:
            raise ValueError(
                f"variants={self.variants} must be a non-empty subset of {list(VARIANTS)}"
            )
        for name in ("d_model", "n_layers", "n_experts", "k", "batch", "seq", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.k > self.n_experts:
            raise ValueError(f"k={self.k} must be <= n_experts={self.n_experts}")


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work. NOTE: host sync, between timed steps only."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(variant: str, sizes: dict[str, int], device: torch.device, steps: int) -> dict:
    """One variant's training: per-step times, first-step time, memory."""
    from moekit.config import MoEConfig
    from moekit.system import System, SystemConfig

    D = sizes["d_model"]
    torch.manual_seed(0)
    moe = MoEConfig(d_model=D, d_hidden=2 * D, n_experts=sizes["n_experts"], k=sizes["k"])
    cfg = SystemConfig(moe=moe, n_layers=sizes["n_layers"], **VARIANTS[variant])
    system = System(cfg).to(device)
    opt = torch.optim.AdamW(system.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(sizes["batch"], sizes["seq"], D, generator=gen).to(device)  # [B, S, D]
    target = torch.randn(x.shape, generator=gen).to(device)
    loss_fn = nn.MSELoss()

    def step() -> None:
        system.training_step((x, target), opt, loss_fn)

    start = time.perf_counter()
    step()
    _sync(device)
    first_s = time.perf_counter() - start
    step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    system.train()
    try:  # compiled graphs keep what they save out of reach of these hooks
        saved = (
            None if cfg.compile else saved_mib(lambda: system(x).y, list(system.parameters()) + [x])
        )
    finally:
        opt.zero_grad(set_to_none=True)
    ms = spread_ms(times)
    tokens = sizes["batch"] * sizes["seq"]
    return {
        "variant": variant,
        "step_ms": ms["median"],
        "step_ms_min": ms["min"],
        "step_ms_max": ms["max"],
        "tokens_per_s": tokens / ms["median"] * 1e3,
        "tokens_per_s_min": tokens / ms["max"] * 1e3,
        "tokens_per_s_max": tokens / ms["min"] * 1e3,
        "first_step_s": first_s,
        "peak_mib": peak,
        "saved_mib": saved,
    }


def _table(rows: list[dict]) -> Table:
    table = Table(
        ("variant", "tokens/s", "step ms (min-max)", "first step s", "peak MiB", "saved MiB")
    )
    for r in rows:
        if "error" in r:
            table.rows.append((r["variant"], "-", "-", "-", "-", r["error"]))
            continue
        table.rows.append(
            (
                r["variant"],
                f"{r['tokens_per_s']:,.0f}",
                f"{r['step_ms']:.1f} ({r['step_ms_min']:.1f}-{r['step_ms_max']:.1f})",
                f"{r['first_step_s']:.2f}",
                "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}",
                "-" if r["saved_mib"] is None else f"{r['saved_mib']:.1f}",
            )
        )
    return table


def _chart(rows: list[dict], device: str, steps: int) -> Chart:
    ok = [r for r in rows if "error" not in r]
    names = [r["variant"] for r in ok]
    speed = Series(
        "tokens/s", names, [r["tokens_per_s"] for r in ok],
        [r["tokens_per_s_min"] for r in ok], [r["tokens_per_s_max"] for r in ok],
    )  # fmt: skip
    first = Series("first step", names, [r["first_step_s"] for r in ok])
    panels = [
        Panel(
            "training throughput",
            [speed],
            "",
            "tokens/s",
            kind="barh",
            note=f"median of {steps}; whiskers: min-max",
        ),
        Panel("first step (compiles)", [first], "", "s", kind="barh"),
    ]
    cuda = device.startswith("cuda")
    memory = [r for r in ok if (r["peak_mib"] if cuda else r["saved_mib"]) is not None]
    if memory:
        key, what = (
            ("peak_mib", "peak memory per step") if cuda else ("saved_mib", "activations saved")
        )
        values = Series(what, [r["variant"] for r in memory], [r[key] for r in memory])
        panels.append(Panel(what, [values], "", "MiB", kind="barh"))
    return Chart(f"moekit.System switches, {device}", panels, cols=3, panel_size=(5.0, 3.2))


@register_bench("system", SystemBench)
def run(
    device: str = "cpu",
    variants: list[str] | tuple[str, ...] = tuple(VARIANTS),
    d_model: int = 128,
    n_layers: int = 2,
    n_experts: int = 8,
    k: int = 2,
    batch: int = 8,
    seq: int = 128,
    steps: int = 10,
    out_dir: str | None = DEFAULT_DIR,
) -> dict[str, Any]:
    """Measures every variant (a failing one, e.g. compile without a compiler, reports why)."""
    dev = torch.device(device)
    sizes = {"d_model": d_model, "n_layers": n_layers, "n_experts": n_experts, "k": k}
    sizes |= {"batch": batch, "seq": seq}
    rows = []
    with progress("bench system", len(variants)) as advance:
        for variant in variants:
            try:
                rows.append(measure(variant, sizes, dev, steps))
            except Exception as err:  # one variant's failure is a finding, not the end of the run
                rows.append(
                    {
                        "variant": variant,
                        "error": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}",
                    }
                )
            advance(variant)
    config = {"device": device, "variants": list(variants), **sizes, "steps": steps}
    return write_report(
        f"system-{dev.type}",
        f"moekit.System switches, {dev.type}",
        bench_command("system", **config),
        [_table(rows)],
        {"rows": rows},
        config=config,
        device=device,
        text=[
            f"{n_layers} residual MoE blocks, D={d_model}, {n_experts} experts top-{k}, batch "
            f"{batch} x {seq} positions, AdamW; median of {steps} steps after 2 untimed. amp: "
            "bf16 autocast. saved MiB: activations one forward keeps for backward. First step: "
            "compilation, unless torch's on-disk compile cache already holds the graphs."
        ],
        out_dir=out_dir,
        chart=_chart(rows, dev.type, steps),
    )
