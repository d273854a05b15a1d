"""`moekit bench layer --device cpu`: the MoE layer per backend vs the naive loop and dense-eq.

Every row times the whole layer users would run (routing included) except dense-eq, which
is the two GEMMs of the same FLOPs with no routing: the floor a routed layer can approach.
Results go to docs/benchmarks/layer-cpu-<date>.md and .json.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import moekit
from moekit.backends import unsupported_reason
from moekit.bench.baselines import dense_equivalent, naive_loop
from moekit.bench.timing import cpu_description, median_ms


@dataclass(frozen=True)
class Shape:
    name: str
    n_experts: int
    k: int
    d_model: int
    d_hidden: int
    tokens: int


CPU_SHAPES = (
    Shape("cpu-sized E8 k2 D512 H1024", 8, 2, 512, 1024, 4096),
    Shape("fine-grained E64 k6 D256 H128", 64, 6, 256, 128, 4096),
)


def _fwd_bwd(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        for t in leaves:
            t.grad = None
        fn().sum().backward()

    return step


def bench_shape(shape: Shape, device: torch.device, repeats: int) -> list[dict]:
    """Median ms of forward and forward+backward for each contender on one shape."""
    torch.manual_seed(0)
    cfg = moekit.MoEConfig(
        d_model=shape.d_model, d_hidden=shape.d_hidden, n_experts=shape.n_experts, k=shape.k
    )
    moe = moekit.MoE(cfg).to(device)
    x = torch.randn(shape.tokens, shape.d_model, device=device, requires_grad=True)
    params = [x, *moe.parameters()]
    contenders: dict[str, Callable[[], torch.Tensor]] = {}
    for backend in ("torch", "grouped_mm", "triton"):
        if unsupported_reason(backend, device, x.dtype) is None:
            contenders[f"moekit[{backend}]"] = lambda b=backend: _layer(moe, x, b)

    def naive() -> torch.Tensor:
        r = moe.router(x)
        e = moe.experts
        return naive_loop(x, r.experts, r.weights, e.w1, e.w2, e.activation)

    contenders["naive loop (HF Mixtral style)"] = naive
    S = shape.tokens * shape.k
    x_SD = torch.randn(S, shape.d_model, device=device, requires_grad=True)
    w1 = moe.experts.w1[0].detach().clone().requires_grad_()
    w2 = moe.experts.w2[0].detach().clone().requires_grad_()
    contenders["dense-eq (same FLOPs, no routing)"] = lambda: dense_equivalent(
        x_SD, w1, w2, "swiglu"
    )

    rows = []
    for name, fn in contenders.items():
        leaves = [x_SD, w1, w2] if name.startswith("dense") else params
        with torch.no_grad():
            fwd = median_ms(fn, repeats)
        rows.append(
            {
                "shape": shape.name,
                "contender": name,
                "fwd_ms": fwd,
                "fwd_bwd_ms": median_ms(_fwd_bwd(fn, leaves), repeats),
            }
        )
    dense = rows[-1]
    naive_row = rows[-2]
    flops = 2 * S * shape.d_model * (2 * shape.d_hidden) + 2 * S * shape.d_hidden * shape.d_model
    for row in rows:
        row["x_dense_fwd"] = row["fwd_ms"] / dense["fwd_ms"]
        row["x_dense_fwd_bwd"] = row["fwd_bwd_ms"] / dense["fwd_bwd_ms"]
        row["speedup_vs_naive_fwd_bwd"] = naive_row["fwd_bwd_ms"] / row["fwd_bwd_ms"]
        row["fwd_gflops"] = flops / row["fwd_ms"] / 1e6
    return rows


def _layer(moe: moekit.MoE, x: torch.Tensor, backend: str) -> torch.Tensor:
    moe.cfg.backend = backend
    return moe(x)[0]


def render(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for col in (
        "shape",
        "contender",
        "fwd ms",
        "fwd+bwd ms",
        "x dense fwd",
        "x dense fwd+bwd",
        "vs naive (fwd+bwd)",
        "fwd GFLOP/s",
    ):
        table.add_column(col, justify="left" if col in ("shape", "contender") else "right")
    for r in rows:
        table.add_row(
            r["shape"],
            r["contender"],
            f"{r['fwd_ms']:.1f}",
            f"{r['fwd_bwd_ms']:.1f}",
            f"{r['x_dense_fwd']:.2f}",
            f"{r['x_dense_fwd_bwd']:.2f}",
            f"{r['speedup_vs_naive_fwd_bwd']:.2f}x",
            f"{r['fwd_gflops']:.0f}",
        )
    return table


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# MoE layer benchmark, {meta['device']}, {meta['date']}",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}; threads {meta['threads']}; "
        f"float32; median of {meta['repeats']} runs after warm-up.",
        f"Command: `{meta['command']}`",
        "",
        "| shape | contender | fwd ms | fwd+bwd ms | x dense fwd | x dense fwd+bwd "
        "| vs naive (fwd+bwd) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['contender']} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | "
            f"{r['x_dense_fwd']:.2f} | {r['x_dense_fwd_bwd']:.2f} | "
            f"{r['speedup_vs_naive_fwd_bwd']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def run(
    device: str = "cpu",
    repeats: int = 15,
    out_dir: str = "docs/benchmarks",
    shapes: tuple[Shape, ...] = CPU_SHAPES,
    console: Console | None = None,
) -> list[dict]:
    console = console or Console()
    dev = torch.device(device)
    rows = [row for shape in shapes for row in bench_shape(shape, dev, repeats)]
    today = dt.date.today().isoformat()
    meta = {
        "device": device,
        "date": today,
        "machine": cpu_description(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "command": f"moekit bench layer --device {device} --repeats {repeats}",
        "shapes": [asdict(s) for s in shapes],
    }
    console.print(render(rows, f"MoE layer, {meta['machine']}"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"layer-{device}-{today}"
    stem.with_suffix(".md").write_text(to_markdown(rows, meta))
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    console.print(f"wrote {stem}.md and {stem}.json")
    return rows
