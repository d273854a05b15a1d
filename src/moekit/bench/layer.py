"""`moekit bench layer`: the MoE layer per backend vs the naive loop and dense-eq.

Every row times the whole layer users would run (routing included) except dense-eq, which
is the two GEMMs of the same FLOPs with no routing: the floor a routed layer can approach.
Results go to docs/benchmarks/layer-<device>-<machine>-<date>.md and .json.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

import moekit
from moekit.backends import unsupported_reason
from moekit.bench.baselines import dense_equivalent, naive_loop
from moekit.bench.registry import bench_command, option, register_bench
from moekit.bench.report import DEFAULT_DIR, Table, write_report
from moekit.bench.timing import median_ms


@dataclass(frozen=True)
class Shape:
    name: str
    n_experts: int
    k: int
    d_model: int
    d_hidden: int
    tokens: int


SHAPES = {
    "cpu-sized": Shape("cpu-sized E8 k2 D512 H1024", 8, 2, 512, 1024, 4096),
    "fine-grained": Shape("fine-grained E64 k6 D256 H128", 64, 6, 256, 128, 4096),
}


@dataclass
class LayerBench:
    """The whole MoE layer (routing included) per backend vs the naive loop and dense-eq."""

    device: str = option("cpu", "cpu or cuda[:N] (CUDA: every timed call ends in a sync)")
    repeats: int = option(15, "timed repetitions; the median is reported")
    shapes: list[str] = option(list(SHAPES), f"layer shapes, from {list(SHAPES)}")
    out_dir: str = option(DEFAULT_DIR, "directory of the .md and .json ('' writes none)")

    def __post_init__(self) -> None:
        if not self.device.startswith(("cpu", "cuda")):
            raise ValueError(f"device={self.device!r} must be cpu or cuda[:N]")
        if self.repeats < 1:
            raise ValueError(f"repeats={self.repeats} must be >= 1")
        unknown = sorted(set(self.shapes) - set(SHAPES))
        if unknown or not self.shapes:
            raise ValueError(f"shapes={self.shapes} must be a non-empty subset of {list(SHAPES)}")


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
            fwd = median_ms(fn, repeats, device=device)
        rows.append(
            {
                "shape": shape.name,
                "contender": name,
                "fwd_ms": fwd,
                "fwd_bwd_ms": median_ms(_fwd_bwd(fn, leaves), repeats, device=device),
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


def _table(rows: list[dict]) -> Table:
    columns = ("shape", "contender", "fwd ms", "fwd+bwd ms", "x dense fwd", "x dense fwd+bwd")
    table = Table((*columns, "vs naive (fwd+bwd)", "fwd GFLOP/s"))
    for r in rows:
        table.rows.append(
            (
                r["shape"],
                r["contender"],
                f"{r['fwd_ms']:.1f}",
                f"{r['fwd_bwd_ms']:.1f}",
                f"{r['x_dense_fwd']:.2f}",
                f"{r['x_dense_fwd_bwd']:.2f}",
                f"{r['speedup_vs_naive_fwd_bwd']:.2f}x",
                f"{r['fwd_gflops']:.0f}",
            )
        )
    return table


@register_bench("layer", LayerBench)
def run(
    device: str = "cpu",
    repeats: int = 15,
    shapes: Sequence[str | Shape] = tuple(SHAPES),
    out_dir: str | None = DEFAULT_DIR,
) -> dict[str, Any]:
    """Times every shape; writes the report (rows under "rows") and returns it."""
    picked = [s if isinstance(s, Shape) else SHAPES[s] for s in shapes]
    dev = torch.device(device)
    rows = [row for shape in picked for row in bench_shape(shape, dev, repeats)]
    options = {"device": device, "repeats": repeats, "shapes": [s.name for s in picked]}
    return write_report(
        f"layer-{dev.type}",
        f"MoE layer benchmark, {dev.type}",
        bench_command("layer", device=device, repeats=repeats, shapes=list(shapes)),
        [_table(rows)],
        {"rows": rows, "shapes": [asdict(s) for s in picked]},
        config=options,
        device=device,
        text=[f"float32; median of {repeats} runs after warm-up; whole layer incl. routing."],
        out_dir=out_dir,
    )
