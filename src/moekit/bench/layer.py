"""`moekit bench layer`: the MoE layer per backend vs the naive loop and dense-eq.

Every row times the whole layer users would run (routing included) except dense-eq, which
is the two GEMMs of the same FLOPs with no routing: the floor a routed layer can approach.
Each shape is timed at every T of `tokens`; rows keep the median and the min-max of the
repeats, and the memory one forward+backward holds (saved activations; CUDA: also peak).
Results go to moekit-out/benchmarks/layer-<device>-<machine>-<date>.md, .json and .png.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from moekit.backends import unsupported_reason
from moekit.bench.baselines import dense_equivalent, naive_loop
from moekit.bench.charts import Chart, Panel, Series
from moekit.bench.registry import bench_command, option, register_bench
from moekit.bench.report import DEFAULT_DIR, Table, write_report
from moekit.bench.timing import sample_ms, spread_ms
from moekit.config import MoEConfig
from moekit.layer import MoE
from moekit.progress import progress


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
    repeats: int = option(15, "timed repetitions; the median (and min-max) is reported")
    shapes: list[str] = option(list(SHAPES), f"layer shapes, from {list(SHAPES)}")
    tokens: list[int] = option([256, 1024, 4096], "tokens T per shape ([] = each shape's own)")
    out_dir: str = option(DEFAULT_DIR, "directory of the .md and .json ('' writes none)")

    def __post_init__(self) -> None:
        if not self.device.startswith(("cpu", "cuda")):
            raise ValueError(f"device={self.device!r} must be cpu or cuda[:N]")
        if self.repeats < 1:
            raise ValueError(f"repeats={self.repeats} must be >= 1")
        unknown = sorted(set(self.shapes) - set(SHAPES))
        if unknown or not self.shapes:
            raise ValueError(f"shapes={self.shapes} must be a non-empty subset of {list(SHAPES)}")
        if any(t < 1 for t in self.tokens):
            raise ValueError(f"tokens={self.tokens} must all be >= 1")


def _fwd_bwd(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        for t in leaves:
            t.grad = None
        fn().sum().backward()

    return step


def saved_mib(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> float:
    """MiB of activations one forward keeps for backward (the leaves' storage not counted)."""
    own = {t.untyped_storage().data_ptr() for t in leaves}  # parameters and inputs, and views
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()) / 2**20


def _sync_peak_mib(step: Callable[[], None], device: torch.device) -> float | None:
    """Peak CUDA memory of one call above what was allocated before it. NOTE: host sync."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def bench_shape(shape: Shape, device: torch.device, repeats: int) -> list[dict]:
    """Median (and min-max) ms of forward and forward+backward per contender on one shape."""
    torch.manual_seed(0)
    cfg = MoEConfig(
        d_model=shape.d_model, d_hidden=shape.d_hidden, n_experts=shape.n_experts, k=shape.k
    )
    moe = MoE(cfg).to(device)
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
            fwd = spread_ms(sample_ms(fn, repeats, device=device))
        step = _fwd_bwd(fn, leaves)
        fwd_bwd = spread_ms(sample_ms(step, repeats, device=device))
        rows.append(
            {
                "shape": shape.name,
                "contender": name,
                "tokens": shape.tokens,
                "fwd_ms": fwd["median"],
                "fwd_bwd_ms": fwd_bwd["median"],
                "fwd_ms_min": fwd["min"],
                "fwd_ms_max": fwd["max"],
                "fwd_bwd_ms_min": fwd_bwd["min"],
                "fwd_bwd_ms_max": fwd_bwd["max"],
                "saved_mib": saved_mib(fn, leaves),
                "peak_mib": _sync_peak_mib(step, device),
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


def _layer(moe: MoE, x: torch.Tensor, backend: str) -> torch.Tensor:
    moe.cfg = replace(moe.cfg, backend=backend)  # the same weights through another backend
    return moe(x)[0]


def _table(rows: list[dict]) -> Table:
    columns = ("shape", "contender", "T", "fwd ms", "fwd+bwd ms", "x dense fwd")
    table = Table((*columns, "x dense fwd+bwd", "vs naive (fwd+bwd)", "fwd GFLOP/s", "saved MiB"))
    for r in rows:
        table.rows.append(
            (
                r["shape"],
                r["contender"],
                r["tokens"],
                f"{r['fwd_ms']:.1f}",
                f"{r['fwd_bwd_ms']:.1f}",
                f"{r['x_dense_fwd']:.2f}",
                f"{r['x_dense_fwd_bwd']:.2f}",
                f"{r['speedup_vs_naive_fwd_bwd']:.2f}x",
                f"{r['fwd_gflops']:.0f}",
                f"{r['saved_mib']:.1f}",
            )
        )
    return table


def _series(rows: list[dict], key: str, spread: bool = True) -> Series:
    """One contender's `key` against T, with its min-max band when `spread`."""
    lo, hi = (
        ([r[f"{key}_min"] for r in rows], [r[f"{key}_max"] for r in rows])
        if spread
        else (None, None)
    )
    name = _short(rows[0]["contender"])
    return Series(name, [r["tokens"] for r in rows], [r[key] for r in rows], lo, hi)


def _short(contender: str) -> str:
    """The chart's name of a contender: without the table's explanation in brackets."""
    return contender.split(" (")[0]


def _chart(rows: list[dict], device: str, repeats: int) -> Chart:
    """Per shape: fwd+bwd ms vs T (floor: dense-eq), speed-up vs naive, bars at the largest T."""
    panels = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape]
        by = {
            c: [r for r in mine if r["contender"] == c]
            for c in dict.fromkeys(r["contender"] for r in mine)
        }
        routed = {c: rs for c, rs in by.items() if not c.startswith("dense")}
        dense = next(rs for c, rs in by.items() if c.startswith("dense"))
        floor = replace(_series(dense, "fwd_bwd_ms", spread=False), label="dense-eq floor")
        short = shape.split(" ")[0]
        panels.append(
            Panel(
                f"{short}: fwd+bwd time", [_series(rs, "fwd_bwd_ms") for rs in routed.values()],
                "tokens T", "ms", logx=True, logy=True, floor=floor,
                note=f"median of {repeats}; band: min-max",
            )
        )  # fmt: skip
        speedup = [
            Series(
                _short(c), [r["tokens"] for r in rs], [r["speedup_vs_naive_fwd_bwd"] for r in rs]
            )
            for c, rs in routed.items()
            if not c.startswith("naive")
        ]
        panels.append(
            Panel(f"{short}: speed-up vs naive loop", speedup, "tokens T", "x (fwd+bwd)", logx=True)
        )
        top = max(r["tokens"] for r in mine)
        last = [r for r in mine if r["tokens"] == top]
        names = [_short(r["contender"]) for r in last]
        bars = Series(
            "fwd+bwd", names, [r["fwd_bwd_ms"] for r in last],
            [r["fwd_bwd_ms_min"] for r in last], [r["fwd_bwd_ms_max"] for r in last],
        )  # fmt: skip
        panels.append(
            Panel(
                f"{short}: fwd+bwd at T={top}",
                [bars],
                "",
                "ms",
                kind="barh",
                note="whiskers: min-max",
            )
        )
        cuda = device.startswith("cuda")
        memory = Series(
            "peak" if cuda else "saved for backward", names,
            [r["peak_mib"] if cuda else r["saved_mib"] for r in last],
        )  # fmt: skip
        what = "peak memory" if cuda else "activations saved"
        panels.append(Panel(f"{short}: {what} at T={top}", [memory], "", "MiB", kind="barh"))
    return Chart(f"MoE layer benchmark, {device}", panels)


@register_bench("layer", LayerBench)
def run(
    device: str = "cpu",
    repeats: int = 15,
    shapes: Sequence[str | Shape] = tuple(SHAPES),
    out_dir: str | None = DEFAULT_DIR,
    tokens: Sequence[int] = (256, 1024, 4096),
) -> dict[str, Any]:
    """Times every shape at every T; writes the report (rows under "rows") and returns it."""
    picked = [s if isinstance(s, Shape) else SHAPES[s] for s in shapes]
    dev = torch.device(device)
    sized = [replace(s, tokens=t) for s in picked for t in (tokens or [s.tokens])]
    rows = []
    with progress("bench layer", len(sized)) as advance:
        for shape in sized:
            rows += bench_shape(shape, dev, repeats)
            advance(f"{shape.name.split(' ')[0]} T={shape.tokens}")
    options = {"device": device, "repeats": repeats, "shapes": [s.name for s in picked]}
    options["tokens"] = list(tokens)
    return write_report(
        f"layer-{dev.type}",
        f"MoE layer benchmark, {dev.type}",
        bench_command(
            "layer", device=device, repeats=repeats, shapes=list(shapes), tokens=list(tokens)
        ),
        [_table(rows)],
        {"rows": rows, "shapes": [asdict(s) for s in picked]},
        config=options,
        device=device,
        text=[
            f"float32; median of {repeats} runs after warm-up; whole layer incl. routing. "
            "saved MiB: activations one forward keeps for backward."
        ],
        out_dir=out_dir,
        chart=_chart(rows, dev.type, repeats),
    )
