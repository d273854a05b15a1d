"""GPU benchmark of stage 3 (the routed experts) against the peers users would otherwise run.

For each shape and token count T, one random routing (fixed seed, softmax top-k of random
logits) and one `Plan` are shared by every method; the timed region is stage 3 given the plan
(the naive loop does its own per-expert bookkeeping, as it would in a model). Methods: the
triton, grouped_mm and torch backends, the Hugging Face Mixtral-style per-expert loop, and
dense-eq (two plain GEMMs with the same FLOPs). The floor is the weight bytes of the experts
actually hit over 3.0 TB/s. Writes docs/benchmarks/<gpu>-<date>.md and .json.

    PYTHONPATH=src python3 -m moekit.bench.layer_cuda [--graph] [--shapes qwen3 ...]

Shape legend: T tokens, K slots per token, S = T * K, E experts, D model dim, H expert hidden.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.backends import get_backend
from moekit.dispatch import make_plan

SHAPES: dict[str, dict[str, int]] = {
    "mixtral": {"E": 8, "K": 2, "D": 4096, "H": 14336},
    "qwen3-30b-a3b": {"E": 128, "K": 8, "D": 2048, "H": 768},
    "deepseek-v2-lite": {"E": 64, "K": 6, "D": 2048, "H": 1408},
}
HBM_BYTES_PER_S = 3.0e12  # measured device-to-device copy rate of an H100 SXM (read + write)
BACKENDS = ("triton", "grouped_mm", "torch")
GRAPHABLE = ("triton", "grouped_mm", "dense-eq")


def _median_ms(fn: Callable[[], object], graph: bool) -> float:
    """Median of do_bench; under graph=True the call is captured once and its replay timed."""
    from triton.testing import do_bench

    if not graph:
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    ms = float(do_bench(g.replay, warmup=25, rep=100, return_mode="median"))
    del g
    return ms


def naive_loop(x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, w1: Tensor, w2: Tensor):
    """Hugging Face Mixtral style: per expert, torch.where -> gather -> MLP -> index_add_."""
    y = torch.zeros_like(x_TD)
    H = w2.shape[1]
    for e in range(w1.shape[0]):
        tok, slot = torch.where(experts_TK == e)
        if tok.numel() == 0:  # NOTE: host sync, as in the original
            continue
        h = x_TD[tok] @ w1[e]
        a = F.silu(h[:, :H]) * h[:, H:]
        out = (a @ w2[e]) * weights_TK[tok, slot, None].to(x_TD.dtype)
        y.index_add_(0, tok, out)
    return y


def _setup(shape: dict[str, int], T: int, dtype: torch.dtype, seed: int = 0):
    E, K, D, H = shape["E"], shape["K"], shape["D"], shape["H"]
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    x = torch.randn(T, D, device=dev, dtype=dtype, generator=g)
    w1 = (torch.randn(E, D, 2 * H, device=dev, dtype=dtype, generator=g) * D**-0.5).contiguous()
    w2 = (torch.randn(E, H, D, device=dev, dtype=dtype, generator=g) * H**-0.5).contiguous()
    logits = torch.randn(T, E, device=dev, generator=g)
    weights, experts = torch.softmax(logits, -1).topk(K, -1)
    plan = make_plan(experts, weights, weights, E)
    return x, w1, w2, experts, weights, plan


def _row(name: str, ms: float, flops: float, dense_ms: float, gmm_ms: float | None) -> dict:
    return {
        "method": name,
        "ms": ms,
        "tflops": flops / ms / 1e9,
        "pct_dense_eq": 100.0 * dense_ms / ms,
        "x_vs_grouped_mm": (gmm_ms / ms) if gmm_ms else None,
    }


def bench_forward(shape: dict[str, int], T: int, dtype: torch.dtype, graph: bool) -> dict:
    """Forward timings of every method at one (shape, T); graph timings where capturable."""
    K, D, H = shape["K"], shape["D"], shape["H"]
    x, w1, w2, experts, weights, plan = _setup(shape, T, dtype)
    S = T * K
    flops = 2.0 * S * D * 3 * H
    hit = int((plan.counts_E > 0).sum())  # NOTE: host sync, outside the timed region
    floor_ms = hit * 3 * D * H * x.element_size() / HBM_BYTES_PER_S * 1e3
    x_SD = torch.randn(S, D, device="cuda", dtype=dtype)
    fns = {name: get_backend(name, x.device, dtype) for name in BACKENDS}
    methods: dict[str, Callable[[], object]] = {
        name: (lambda f=f: f(x, plan, w1, w2, None, None, "swiglu")) for name, f in fns.items()
    }
    methods["naive-loop"] = lambda: naive_loop(x, experts, weights, w1, w2)
    methods["dense-eq"] = lambda: (F.silu((h := x_SD @ w1[0])[:, :H]) * h[:, H:]) @ w2[0]
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
    """fwd+bwd time and peak memory above the inputs, per backend, gradients for all inputs."""
    x, w1, w2, experts, weights, plan = _setup(shape, T, dtype)
    leaves = [t.detach().requires_grad_() for t in (x, w1, w2, weights)]
    dy = torch.randn_like(x)
    rows = []
    for name in (*BACKENDS, "naive-loop"):

        def step(name: str = name) -> None:
            xl, w1l, w2l, wl = leaves
            if name == "naive-loop":
                y = naive_loop(xl, experts, wl, w1l, w2l)
            else:
                fn = get_backend(name, x.device, dtype)
                used = dataclasses.replace(plan, weight_S=wl.reshape(-1)[plan.order_S])
                y = fn(xl, used, w1l, w2l, None, None, "swiglu")
            torch.autograd.grad(y, leaves, dy)

        step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        rows.append({"method": name, "ms": _median_ms(step, False), "peak_gib": peak / 2**30})
    return rows


def _markdown(report: dict) -> str:
    lines = [
        f"# Layer benchmark (stage 3, bf16) on {report['machine']['gpu']}, {report['date']}",
        "",
        f"torch {report['machine']['torch']}, triton {report['machine']['triton']}. "
        "Median ms of triton.testing.do_bench; routing and Plan built outside the timed region. "
        "floor = weight bytes of the experts hit / 3.0 TB/s.",
        f"Command: `{report['command']}`",
    ]
    for name, res in report["shapes"].items():
        lines += ["", f"## {name} {res['dims']}", ""]
        head = "| T | floor ms | mode | method | ms | TFLOP/s | % dense-eq | x vs grouped_mm |"
        lines += [head, "|---|---|---|---|---|---|---|---|"]
        for fwd in res["forward"]:
            for mode in ("eager", "graph"):
                for r in fwd.get(mode, []):
                    vs = f"{r['x_vs_grouped_mm']:.2f}" if r["x_vs_grouped_mm"] else "-"
                    lines.append(
                        f"| {fwd['T']} | {fwd['floor_ms']:.3f} | {mode} | {r['method']} | "
                        f"{r['ms']:.3f} | {r['tflops']:.1f} | {r['pct_dense_eq']:.0f} | {vs} |"
                    )
        if res.get("fwd_bwd"):
            lines += ["", f"fwd+bwd at T={res['fwd_bwd_T']}:", "", "| method | ms | peak GiB |"]
            lines += ["|---|---|---|"]
            lines += [
                f"| {r['method']} | {r['ms']:.3f} | {r['peak_gib']:.2f} |" for r in res["fwd_bwd"]
            ]
    return "\n".join(lines) + "\n"


def run(
    shapes: tuple[str, ...] = tuple(SHAPES),
    tokens: tuple[int, ...] = (1, 16, 128, 1024, 4096, 16384),
    graph: bool = False,
    out_dir: str | None = "docs/benchmarks",
    backward_tokens: int | None = 4096,
    command: str = "python -m moekit.bench.layer_cuda",
) -> dict:
    """Benchmark every shape and T; print a table; write <gpu>-<date>.md/.json to out_dir."""
    import triton

    dtype = torch.bfloat16
    report = {
        "date": dt.date.today().isoformat(),
        "command": command,
        "machine": {
            "gpu": torch.cuda.get_device_name(),
            "host": platform.node(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
        },
        "shapes": {},
    }
    for name in shapes:
        shape = SHAPES[name]
        res = {"dims": shape, "forward": []}
        for T in tokens:
            fwd = bench_forward(shape, T, dtype, graph)
            res["forward"].append(fwd)
            for mode in ("eager", "graph"):
                cells = " ".join(f"{r['method']}={r['ms']:.3f}" for r in fwd.get(mode, []))
                if cells:
                    print(f"{name} T={T} floor={fwd['floor_ms']:.3f} {mode}: {cells}", flush=True)
        if backward_tokens:
            res["fwd_bwd_T"] = backward_tokens
            res["fwd_bwd"] = bench_backward(shape, backward_tokens, dtype)
            cells = " ".join(
                f"{r['method']}={r['ms']:.3f}ms/{r['peak_gib']:.2f}GiB" for r in res["fwd_bwd"]
            )
            print(f"{name} fwd+bwd T={backward_tokens}: {cells}", flush=True)
        report["shapes"][name] = res
        torch.cuda.empty_cache()
    if out_dir:
        gpu = "-".join(report["machine"]["gpu"].split())
        stem = Path(out_dir) / f"{gpu}-{report['date']}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
        stem.with_suffix(".md").write_text(_markdown(report))
        print(f"wrote {stem}.md and .json")
    return report


# representative T per shape class (see moekit.backends.triton.configs.shape_class)
_TUNE_T = {
    "decode": {"mixtral": 16, "qwen3-30b-a3b": 16, "deepseek-v2-lite": 16},
    "small": {"mixtral": 128, "qwen3-30b-a3b": 256, "deepseek-v2-lite": 128},
    "medium": {"mixtral": 256, "qwen3-30b-a3b": 1024, "deepseek-v2-lite": 1024},
    "large": {"mixtral": 4096, "qwen3-30b-a3b": 4096, "deepseek-v2-lite": 4096},
}


def _candidates(cls: str) -> list[tuple[int, dict]]:
    """(block_m, kernel config) pairs searched for one shape class."""
    if cls in ("decode", "small"):
        grid = [
            (16 if cls == "decode" else 32, bn, bk, 1, 4, st)
            for bn in (32, 64, 128)
            for bk in (128, 256)
            for st in (3, 5)
        ]
    elif cls == "medium":
        grid = [
            (bm, bn, 64, 8, w, st)
            for bm in (64, 128)
            for bn in (128, 256)
            for w in (4, 8)
            for st in (3, 4)
        ]
    else:
        grid = [(128, bn, 64, 8, 8, st) for bn in (128, 256) for st in (3, 4, 5)]
        grid += [(64, 256, 64, 8, 8, 4), (128, 128, 128, 8, 8, 3)]
    keys = ("block_n", "block_k", "group_m", "num_warps", "num_stages")
    return [(g[0], dict(zip(keys, g[1:], strict=True))) for g in grid]


def tune(out_path: str | None = None) -> dict:
    """Search up / down configs per shape class on this GPU; write the per-device JSON."""
    from triton.testing import do_bench

    from moekit.backends.triton.align import schedule
    from moekit.backends.triton.configs import _DIR, DEFAULT, device_key
    from moekit.backends.triton.up import grouped_gemm

    table = {}
    for cls, per_shape in _TUNE_T.items():
        cases = []
        for name, T in per_shape.items():
            x, w1, w2, _, _, plan = _setup(SHAPES[name], T, torch.bfloat16)
            a = torch.randn(plan.token_S.shape[0], SHAPES[name]["H"], device="cuda").bfloat16()
            cases.append((x, w1, w2, a, plan))
        best: dict[tuple[int, str], tuple[float, dict]] = {}
        for block_m, cfg in _candidates(cls):
            for kernel in ("up", "down"):
                total = 0.0
                try:
                    for x, w1, w2, a, plan in cases:
                        S = plan.token_S.shape[0]
                        sched = schedule(plan.offsets_E1, S, block_m)
                        if kernel == "up":
                            args = (x, w1, sched, plan.offsets_E1, S, cfg, block_m)
                            kw = {"gather_S": plan.token_S, "activation": "swiglu"}
                        else:
                            args, kw = (a, w2, sched, plan.offsets_E1, S, cfg, block_m), {}
                        fn = partial(grouped_gemm, *args, **kw)
                        total += float(do_bench(fn, warmup=5, rep=30, return_mode="median"))
                except Exception as err:  # configs past the shared-memory limit fail to compile
                    print(f"tune {cls} {kernel} bm={block_m} {cfg}: {type(err).__name__}")
                    continue
                print(f"tune {cls} {kernel} bm={block_m} {cfg}: {total:.4f} ms", flush=True)
                if total < best.get((block_m, kernel), (float("inf"), {}))[0]:
                    best[(block_m, kernel)] = (total, cfg)
        block_ms = {bm for bm, _ in best if (bm, "up") in best and (bm, "down") in best}
        pick = min(block_ms, key=lambda bm: best[(bm, "up")][0] + best[(bm, "down")][0])
        table[cls] = {
            **DEFAULT[cls],
            "block_m": pick,
            "up": best[(pick, "up")][1],
            "down": best[(pick, "down")][1],
        }
        print(f"tuned {cls}: {table[cls]}", flush=True)
    path = Path(out_path) if out_path else _DIR / f"{device_key(torch.device('cuda'))}.json"
    path.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {path}")
    return table


def tune_backward(classes: tuple[str, ...] = ("large", "medium")) -> dict:
    """Time backward kernel configs (dh, dx, wgrad) per shape class; print the best of each."""
    import triton
    from triton.testing import do_bench

    from moekit.backends.triton import backward as bw
    from moekit.backends.triton.align import schedule
    from moekit.backends.triton.configs import config_by_key
    from moekit.backends.triton.up import grouped_gemm

    gemm_keys = ("block_n", "block_k", "group_m", "num_warps", "num_stages")
    gemms = [(128, 64, 8, 8, 3), (128, 64, 8, 8, 4), (256, 64, 8, 8, 3), (128, 64, 8, 4, 4)]
    gemms += [(64, 64, 8, 4, 4), (128, 128, 8, 8, 3)]
    wkeys = ("block_m", "block_p", "block_q", "num_warps", "num_stages")
    wgrads = [(64, 128, 128, 8, 3), (32, 128, 128, 8, 4), (64, 128, 128, 4, 3)]
    wgrads += [(128, 128, 128, 8, 3), (64, 128, 256, 8, 3), (64, 256, 128, 8, 3)]
    wgrads += [(64, 64, 128, 4, 4), (32, 128, 128, 4, 4)]
    best = {}
    for cls in classes:
        cases = []
        for name, T in _TUNE_T[cls].items():
            x, w1, w2, _, _, plan = _setup(SHAPES[name], T, torch.bfloat16)
            S, H = plan.token_S.shape[0], SHAPES[name]["H"]
            h1 = torch.randn(S, 2 * H, device="cuda").bfloat16()
            cases.append((x, w1, w2, h1, torch.randn_like(x), plan))
        block_m = config_by_key(torch.device("cuda"), cls)["block_m"]
        for kind, grid in (("dh", gemms), ("dx", gemms), ("wgrad", wgrads)):
            for values in grid:
                cfg = dict(zip(wkeys if kind == "wgrad" else gemm_keys, values, strict=True))
                total = 0.0
                try:
                    for x, w1, w2, h1, dy, plan in cases:
                        S, off = plan.token_S.shape[0], plan.offsets_E1
                        sched = schedule(off, S, block_m)
                        if kind == "dx":
                            fn = partial(
                                grouped_gemm, h1, w1.transpose(1, 2), sched, off, S, cfg, block_m
                            )
                        elif kind == "wgrad":
                            dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)

                            def fn(x=x, h1=h1, dy=dy, plan=plan, dw1=dw1, dw2=dw2, cfg=cfg):
                                o, t = plan.offsets_E1, plan.token_S
                                bw._wgrad(h1, dy, dw2, None, o, cfg, right_idx=t,
                                          scale=plan.weight_S, activation="swiglu")  # fmt: skip
                                bw._wgrad(x, h1, dw1, None, o, cfg, left_idx=t)
                        else:
                            H = w2.shape[1]
                            nb = triton.cdiv(H, cfg["block_n"])
                            dwp = torch.zeros(S, nb, device="cuda")
                            hh = h1.clone()
                            fn = partial(
                                bw._dh_kernel[(sched[0].shape[0] * nb,)],
                                dy, plan.token_S, w2, hh, plan.weight_S, hh, dwp, *sched, off,
                                sched[0].shape[0], H, x.shape[1], off.shape[0] - 1,
                                *dy.stride(), *w2.stride(), *hh.stride(), *hh.stride(),
                                dwp.stride(0), BLOCK_M=block_m, BLOCK_N=cfg["block_n"],
                                BLOCK_K=cfg["block_k"], GROUP_M=cfg["group_m"], ACT=3,
                                GATED=True, PRECISION="tf32", num_warps=cfg["num_warps"],
                                num_stages=cfg["num_stages"],
                            )  # fmt: skip
                        total += float(do_bench(fn, warmup=5, rep=30, return_mode="median"))
                except Exception as err:  # past the shared-memory limit
                    print(f"tune-bw {cls} {kind} {cfg}: {type(err).__name__}", flush=True)
                    continue
                print(f"tune-bw {cls} {kind} {cfg}: {total:.4f} ms", flush=True)
                if total < best.get((cls, kind), (float("inf"), {}))[0]:
                    best[(cls, kind)] = (total, cfg)
    for key, (total, cfg) in best.items():
        print(f"best-bw {key}: {total:.4f} ms {cfg}")
    return best


def profile(shapes: tuple[str, ...], T: int = 4096) -> None:
    """Per-kernel CUDA time of one triton fwd+bwd per shape (torch.profiler), printed."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name in shapes:
        x, w1, w2, _, weights, plan = _setup(SHAPES[name], T, torch.bfloat16)
        leaves = [t.detach().requires_grad_() for t in (x, w1, w2, weights)]
        fn = get_backend("triton", x.device, x.dtype)

        def step(leaves=leaves, plan=plan, fn=fn) -> None:
            xl, w1l, w2l, wl = leaves
            used = dataclasses.replace(plan, weight_S=wl.reshape(-1)[plan.order_S])
            y = fn(xl, used, w1l, w2l, None, None, "swiglu")
            torch.autograd.grad(y, leaves, torch.ones_like(y))

        step()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(f"== profile {name} T={T} fwd+bwd")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 128, 1024, 4096, 16384])
    parser.add_argument("--graph", action="store_true", help="also time CUDA-graph replay")
    parser.add_argument("--backward-tokens", type=int, default=4096, help="0 to skip fwd+bwd")
    parser.add_argument("--out-dir", default="docs/benchmarks")
    parser.add_argument("--tune", metavar="JSON", help="tune kernel configs, write JSON, exit")
    parser.add_argument("--tune-backward", action="store_true", help="time backward configs")
    parser.add_argument("--profile", action="store_true", help="per-kernel fwd+bwd profile")
    args = parser.parse_args(argv)
    if args.tune:
        tune(args.tune)
        return
    if args.profile:
        profile(tuple(args.shapes))
        return
    if args.tune_backward:
        tune_backward()
        return
    run(
        tuple(args.shapes),
        tuple(args.tokens),
        args.graph,
        args.out_dir,
        args.backward_tokens,
        command="python -m moekit.bench.layer_cuda " + " ".join(argv or __import__("sys").argv[1:]),
    )


if __name__ == "__main__":
    main()
