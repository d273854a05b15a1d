"""`moekit bench kernels`: stage 3 (the routed experts) on CUDA against the peers.

For each shape and token count T, one random routing (fixed seed, softmax top-k of random
logits) and one `Plan` are shared by every method; the timed region is stage 3 given the plan
(the naive loop does its own per-expert bookkeeping, as it would in a model). Methods: the
triton, grouped_mm and torch backends, the Hugging Face Mixtral-style per-expert loop, and
dense-eq (two plain GEMMs with the same FLOPs). The floor is the weight bytes of the experts
actually hit over the device-to-device copy rate measured at the start of the run. With
--layer, each (shape, T) also times what a user pays (`bench.layer_cuda`): the whole layer,
the span after the router's top-k, each stage alone, and the same spans of the sort +
grouped_mm pipeline and the naive loop. Graph replay is timed for T <= --graph-max-tokens.

Shape legend: T tokens, K slots per token, S = T * K, E experts, D model dim, H expert hidden.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moekit.backends import get_backend
from moekit.bench.baselines import dense_equivalent, naive_loop
from moekit.bench.registry import bench_command, option, register_bench
from moekit.bench.report import DEFAULT_DIR, Table, write_report
from moekit.dispatch import make_plan
from moekit.replay import capture
from moekit.types import ExpertWeights, Plan

SHAPES: dict[str, dict[str, int]] = {
    "mixtral": {"E": 8, "K": 2, "D": 4096, "H": 14336},
    "qwen3-30b-a3b": {"E": 128, "K": 8, "D": 2048, "H": 768},
    "deepseek-v2-lite": {"E": 64, "K": 6, "D": 2048, "H": 1408},
}
TOKENS = [1, 16, 128, 1024, 4096, 16384]
BACKENDS = ("triton", "grouped_mm", "torch")
GRAPHABLE = ("triton", "grouped_mm", "dense-eq")


SHAPE_FORM = "e<E>k<K>d<D>h<H> (e.g. e64k8d2048h1024)"
_CUSTOM = re.compile(r"^e(\d+)k(\d+)d(\d+)h(\d+)$")  # e.g. e64k8d2048h1024: your own model


def shape_of(name: str) -> dict[str, int]:
    """A named shape from SHAPES, or E, K, D, H spelled out as `e<E>k<K>d<D>h<H>`."""
    if name in SHAPES:
        return SHAPES[name]
    m = _CUSTOM.match(name)
    if m is None:
        raise ValueError(f"shape {name!r} is not one of {list(SHAPES)} nor e<E>k<K>d<D>h<H>")
    E, K, D, H = (int(g) for g in m.groups())
    if min(E, K, D, H) < 1 or K > E:
        raise ValueError(f"shape {name!r} needs E, K, D, H >= 1 and K <= E")
    return {"E": E, "K": K, "D": D, "H": H}


def check_shapes(shapes: Sequence[str]) -> None:
    """ValueError naming `shapes` unless each is a SHAPES key or an e<E>k<K>d<D>h<H> shape."""
    if not shapes:
        raise ValueError(f"shapes={shapes} must name at least one shape of {list(SHAPES)}")
    for name in shapes:
        try:
            shape_of(name)
        except ValueError as err:
            raise ValueError(f"shapes={list(shapes)}: {err}") from err


@dataclass
class KernelsBench:
    """Stage 3 (routed experts, bf16) on CUDA: each backend vs the naive loop and dense-eq;
    with --layer also the whole layer, the span from top-k and each stage."""

    shapes: list[str] = option(list(SHAPES), f"model shapes, from {list(SHAPES)} or {SHAPE_FORM}")
    tokens: list[int] = option(TOKENS, "token counts T timed for every shape")
    graph: bool = option(False, "also time CUDA-graph replay of the capturable methods")
    graph_max_tokens: int = option(128, "largest T whose graph replay is timed")
    layer: bool = option(False, "also time the whole layer, the span from top-k and each stage")
    backward_tokens: int = option(4096, "T of the fwd+bwd and peak-memory table; 0 skips it")
    out_dir: str = option(DEFAULT_DIR, "directory of the .md and .json ('' writes none)")

    def __post_init__(self) -> None:
        check_shapes(self.shapes)
        if not self.tokens or min(self.tokens) < 1:
            raise ValueError(f"tokens={self.tokens} must be a non-empty list of counts >= 1")
        if self.backward_tokens < 0:
            raise ValueError(f"backward_tokens={self.backward_tokens} must be >= 0")
        if self.graph_max_tokens < 0:
            raise ValueError(f"graph_max_tokens={self.graph_max_tokens} must be >= 0")


def _median_ms(fn: Callable[[], object], graph: bool) -> float:
    """Median of do_bench; under graph=True the call is captured once and its replay timed."""
    from triton.testing import do_bench

    if not graph:
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    g, _ = capture(fn, torch.device("cuda", torch.cuda.current_device()), warmup=2)
    ms = float(do_bench(g.replay, warmup=25, rep=100, return_mode="median"))
    del g
    return ms


def setup(
    shape: dict[str, int], T: int, dtype: torch.dtype, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Plan]:
    """x [T, D], w1 [E, D, 2H], w2 [E, H, D], experts / weights [T, K] and their Plan."""
    E, K, D, H = shape["E"], shape["K"], shape["D"], shape["H"]
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    x = torch.randn(T, D, device=dev, dtype=dtype, generator=g)
    w1 = (torch.randn(E, D, 2 * H, device=dev, dtype=dtype, generator=g) * D**-0.5).contiguous()
    w2 = (torch.randn(E, H, D, device=dev, dtype=dtype, generator=g) * H**-0.5).contiguous()
    logits = torch.randn(T, E, device=dev, generator=g)
    weights, experts = torch.softmax(logits, -1).topk(K, -1)
    # the plan the layer builds on CUDA (the counting sort), as every backend here would get
    plan = make_plan(experts, weights, weights, E, backend=get_backend("triton", x.device, dtype))
    return x, w1, w2, experts, weights, plan


def _row(name: str, ms: float, flops: float, dense_ms: float, gmm_ms: float | None) -> dict:
    return {
        "method": name,
        "ms": ms,
        "tflops": flops / ms / 1e9,
        "pct_dense_eq": 100.0 * dense_ms / ms,
        "x_vs_grouped_mm": (gmm_ms / ms) if gmm_ms else None,
    }


def bench_forward(
    shape: dict[str, int], T: int, dtype: torch.dtype, graph: bool, bytes_per_s: float
) -> dict:
    """Forward timings of every method at one (shape, T); graph timings where capturable."""
    K, D = shape["K"], shape["D"]
    x, w1, w2, experts, weights, plan = setup(shape, T, dtype)
    S = T * K
    flops = 2.0 * S * D * 3 * shape["H"]
    hit = int((plan.counts_E > 0).sum())  # NOTE: host sync, outside the timed region
    floor_ms = hit * 3 * D * shape["H"] * x.element_size() / bytes_per_s * 1e3
    x_SD = torch.randn(S, D, device="cuda", dtype=dtype)
    fns = {name: get_backend(name, x.device, dtype) for name in BACKENDS}
    methods: dict[str, Callable[[], object]] = {
        name: (lambda f=f: f.forward(x, plan, ExpertWeights(w1, w2), "swiglu"))
        for name, f in fns.items()
    }
    methods["naive-loop"] = lambda: naive_loop(x, experts, weights, w1, w2, "swiglu")
    methods["dense-eq"] = lambda: dense_equivalent(x_SD, w1[0], w2[0], "swiglu")
    eager = {name: _median_ms(fn, False) for name, fn in methods.items()}
    rows = [_row(n, ms, flops, eager["dense-eq"], eager["grouped_mm"]) for n, ms in eager.items()]
    result = {"T": T, "S": S, "experts_hit": hit, "floor_ms": floor_ms, "eager": rows}
    if graph:
        timed = {n: _median_ms(methods[n], True) for n in GRAPHABLE}
        result["graph"] = [
            _row(n, ms, flops, timed["dense-eq"], timed["grouped_mm"]) for n, ms in timed.items()
        ]
    return result


def bench_backward(shape: dict[str, int], T: int, dtype: torch.dtype) -> list[dict]:
    """fwd+bwd time, peak memory above the inputs and activation memory (that peak less the
    gradients) per backend, gradients for all inputs."""
    x, w1, w2, experts, weights, plan = setup(shape, T, dtype)
    leaves = [t.detach().requires_grad_() for t in (x, w1, w2, weights)]
    grad_bytes = sum(t.numel() * t.element_size() for t in leaves)
    dy = torch.randn_like(x)
    rows = []
    for name in (*BACKENDS, "naive-loop"):

        def step(name: str = name) -> None:
            xl, w1l, w2l, wl = leaves
            if name == "naive-loop":
                y = naive_loop(xl, experts, wl, w1l, w2l, "swiglu")
            else:
                fn = get_backend(name, x.device, dtype)
                used = dataclasses.replace(plan, weight_S=wl.reshape(-1)[plan.order_S])
                y = fn.forward(xl, used, ExpertWeights(w1l, w2l), "swiglu")
            torch.autograd.grad(y, leaves, dy)

        step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms = _median_ms(step, False)
        rows.append({"method": name, "ms": ms, "peak_gib": peak / 2**30})
        rows[-1]["activation_gib"] = (peak - grad_bytes) / 2**30
    gmm = next(r for r in rows if r["method"] == "grouped_mm")
    for r in rows:
        r["x_time_vs_grouped_mm"] = r["ms"] / gmm["ms"]
        r["x_activation_vs_grouped_mm"] = r["activation_gib"] / max(gmm["activation_gib"], 1e-9)
    return rows


def _tables(shapes: dict[str, dict]) -> list[Table]:
    tables = []
    for name, res in shapes.items():
        columns = ("T", "floor ms", "mode", "method", "ms", "TFLOP/s", "% dense-eq")
        table = Table((*columns, "x vs grouped_mm"), title=f"{name} {res['dims']}")
        for fwd in res["forward"]:
            for mode in ("eager", "graph"):
                for r in fwd.get(mode, []):
                    vs = f"{r['x_vs_grouped_mm']:.2f}" if r["x_vs_grouped_mm"] else "-"
                    table.rows.append(
                        (fwd["T"], f"{fwd['floor_ms']:.3f}", mode, r["method"], f"{r['ms']:.3f}")
                        + (f"{r['tflops']:.1f}", f"{r['pct_dense_eq']:.0f}", vs)
                    )
        tables.append(table)
        if res.get("layer"):
            tables.append(_layer_table(name, res["layer"]))
        if res.get("fwd_bwd"):
            rows = [
                (r["method"], f"{r['ms']:.3f}", f"{r['x_time_vs_grouped_mm']:.2f}")
                + (f"{r['peak_gib']:.2f}", f"{r['activation_gib']:.2f}")
                + (f"{r['x_activation_vs_grouped_mm']:.2f}",)
                for r in res["fwd_bwd"]
            ]
            title = f"{name} fwd+bwd at T={res['fwd_bwd_T']}"
            columns = ("method", "ms", "x grouped_mm time", "peak GiB", "activation GiB")
            tables.append(Table((*columns, "x grouped_mm activation"), rows, title=title))
    return tables


def _layer_table(name: str, per_T: list[dict]) -> Table:
    """Spans as rows, T (eager, and graph where timed) as columns."""
    modes = [(r["T"], m) for r in per_T for m in ("graph", "eager") if r["modes"].get(m)]
    spans = list(dict.fromkeys(span for r in per_T for m in r["modes"].values() for span in m))
    table = Table(("span", *(f"T={T} {m}" for T, m in modes)), title=f"{name}: what a user pays")
    for span in spans:
        cells = []
        for T, mode in modes:
            hit = [r for r in per_T if r["T"] == T][0]["modes"][mode].get(span)
            cells.append(f"{hit:.3f}" if hit is not None else "-")
        table.rows.append((span, *cells))
    return table


@register_bench("kernels", KernelsBench)
def run(
    shapes: Sequence[str] = tuple(SHAPES),
    tokens: Sequence[int] = tuple(TOKENS),
    graph: bool = False,
    graph_max_tokens: int = 128,
    layer: bool = False,
    backward_tokens: int = 4096,
    out_dir: str | None = DEFAULT_DIR,
) -> dict[str, Any]:
    """Benchmark every shape and T, printing each result; write and return the report."""
    from moekit.bench.layer_cuda import bench_layer, copy_bandwidth

    dtype = torch.bfloat16
    bytes_per_s = copy_bandwidth()
    print(f"device-to-device copy: {bytes_per_s / 1e12:.2f} TB/s", flush=True)
    results: dict[str, dict] = {}
    for name in shapes:
        shape = shape_of(name)
        res: dict[str, Any] = {"dims": shape, "forward": []}
        for T in tokens:
            graph_T = graph and graph_max_tokens >= T
            fwd = bench_forward(shape, T, dtype, graph_T, bytes_per_s)
            res["forward"].append(fwd)
            for mode in ("eager", "graph"):
                cells = " ".join(f"{r['method']}={r['ms']:.3f}" for r in fwd.get(mode, []))
                if cells:
                    print(f"{name} T={T} floor={fwd['floor_ms']:.3f} {mode}: {cells}", flush=True)
            if layer:
                rows = bench_layer(shape, T, graph_T, _median_ms)
                modes: dict[str, dict] = {"eager": {}, "graph": {}}
                for r in rows:
                    modes[r["mode"]][r["span"]] = r["ms"]
                    print(f"{name} T={T} {r['mode']} {r['span']}: {r['ms']:.3f}", flush=True)
                res.setdefault("layer", []).append({"T": T, "modes": modes})
        if backward_tokens:
            res["fwd_bwd_T"] = backward_tokens
            res["fwd_bwd"] = bench_backward(shape, backward_tokens, dtype)
        results[name] = res
        torch.cuda.empty_cache()
    options = {"shapes": list(shapes), "tokens": list(tokens), "graph": graph}
    options |= {"graph_max_tokens": graph_max_tokens, "layer": layer}
    options["backward_tokens"] = backward_tokens
    return write_report(
        "kernels",
        "Stage 3 kernels (bf16, SwiGLU)",
        bench_command("kernels", **options),
        _tables(results),
        {"shapes": results, "copy_bytes_per_s": bytes_per_s},
        config=options,
        device="cuda",
        text=[
            "Median ms of triton.testing.do_bench. Stage 3 tables: routing and Plan built outside "
            "the timed region; floor = weight bytes of the experts hit / the measured "
            f"device-to-device copy rate, {bytes_per_s / 1e12:.2f} TB/s. 'what a user pays' "
            "tables: see moekit.bench.layer_cuda (layer = MoE.__call__; from top-k = plan + "
            "experts + combine). fwd+bwd: activation GiB = peak above weights and inputs, less "
            "the gradients."
        ],
        out_dir=out_dir,
    )
