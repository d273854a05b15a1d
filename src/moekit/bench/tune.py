"""Triton kernel tuning and profiling on CUDA: `moekit bench tune`, `tune-backward`, `profile`.

`tune` searches tile configs per shape class (forward up / down, and with --backward the dh,
dx and wgrad kernels too) on the local GPU and writes them to the user's config cache, which
`moekit.backends.triton.configs` reads before the shipped files; `tune-backward` only reports
backward timings; `profile` lists the kernels of one fwd+bwd with their CUDA time.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from moekit.backends import get_backend
from moekit.bench.kernels import SHAPE_FORM, SHAPES, check_shapes, setup, shape_of
from moekit.bench.registry import bench_command, option, register_bench
from moekit.bench.report import DEFAULT_DIR, Table, write_report
from moekit.types import ExpertWeights

CLASSES = ("decode", "small", "batch", "medium", "large")
_PROFILE_ROWS = 14


@dataclass
class TuneBench:
    """Search Triton tile configs per shape class on this GPU; write them to the config cache."""

    out: str = option("", "JSON path to write ('' = the user's config cache for this GPU)")
    shapes: list[str] = option(
        list(SHAPES), f"model shapes tuned for, from {list(SHAPES)} or {SHAPE_FORM}"
    )
    classes: list[str] = option(list(CLASSES), f"shape classes, from {list(CLASSES)}")
    backward: bool = option(False, "also tune the backward kernels (dh, dx, wgrad)")

    def __post_init__(self) -> None:
        check_shapes(self.shapes)
        if not self.classes or not set(self.classes) <= set(CLASSES):
            raise ValueError(f"classes={self.classes} must be a non-empty subset of {CLASSES}")


@dataclass
class TuneBackwardBench:
    """Time backward Triton configs (dh, dx, wgrad) per shape class; report the fastest."""

    classes: list[str] = option(["large", "medium"], f"shape classes, from {list(CLASSES)}")
    out_dir: str = option(DEFAULT_DIR, "directory of the .md and .json ('' writes none)")

    def __post_init__(self) -> None:
        if not self.classes or not set(self.classes) <= set(CLASSES):
            raise ValueError(f"classes={self.classes} must be a non-empty subset of {CLASSES}")


@dataclass
class ProfileBench:
    """Per-kernel CUDA time of one triton fwd+bwd per shape (torch.profiler)."""

    shapes: list[str] = option(list(SHAPES), f"model shapes, from {list(SHAPES)} or {SHAPE_FORM}")
    tokens: int = option(4096, "tokens T of the profiled step")
    out_dir: str = option(DEFAULT_DIR, "directory of the .md and .json ('' writes none)")

    def __post_init__(self) -> None:
        check_shapes(self.shapes)
        if self.tokens < 1:
            raise ValueError(f"tokens={self.tokens} must be >= 1")


# representative T per shape class (see moekit.backends.triton.configs.shape_class)
_TUNE_T = {
    "decode": {"mixtral": 16, "qwen3-30b-a3b": 16, "deepseek-v2-lite": 16},
    "small": {"mixtral": 64, "qwen3-30b-a3b": 256, "deepseek-v2-lite": 128},
    "batch": {"mixtral": 128, "qwen3-30b-a3b": 512, "deepseek-v2-lite": 384},
    "medium": {"mixtral": 256, "qwen3-30b-a3b": 1024, "deepseek-v2-lite": 1024},
    "large": {"mixtral": 4096, "qwen3-30b-a3b": 4096, "deepseek-v2-lite": 4096},
}
# other shapes: sorted rows per expert (S / E) inside each class's range
_ROWS_PER_EXPERT = {"decode": 2, "small": 16, "batch": 32, "medium": 96, "large": 256}


def tune_tokens(cls: str, name: str) -> int:
    """T of the tuning case of one shape class for one shape."""
    if name in _TUNE_T[cls]:
        return _TUNE_T[cls][name]
    shape = shape_of(name)
    return max(1, -(-_ROWS_PER_EXPERT[cls] * shape["E"] // shape["K"]))


def _candidates(cls: str) -> list[tuple[int, dict]]:
    """(block_m, kernel config) pairs searched for one shape class."""
    if cls in ("decode", "small"):
        grid = [
            (16 if cls == "decode" else 32, bn, bk, 1, 4, st)
            for bn in (32, 64, 128)
            for bk in (128, 256)
            for st in (3, 5)
        ]
    elif cls in ("batch", "medium"):
        grid = [
            (bm, bn, 64, 8, w, st)
            for bm in ((32, 64) if cls == "batch" else (64, 128))
            for bn in (128, 256)
            for w in (4, 8)
            for st in (3, 4)
        ]
    else:
        grid = [(128, bn, 64, 8, 8, st) for bn in (128, 256) for st in (3, 4, 5)]
        grid += [(64, 256, 64, 8, 8, 4), (128, 128, 128, 8, 8, 3)]
    keys = ("block_n", "block_k", "group_m", "num_warps", "num_stages")
    return [(g[0], dict(zip(keys, g[1:], strict=True))) for g in grid]


def tune_path(out: str = "") -> Path:
    """The JSON `tune` writes: `out`, else this GPU's file in the user's config cache."""
    from moekit.backends.triton.configs import cache_dir, device_key

    return Path(out) if out else cache_dir() / f"{device_key(torch.device('cuda'))}.json"


def merge_tuned(path: Path, tuned: dict[str, dict]) -> dict[str, dict]:
    """The file's classes updated with the new ones (kernel by kernel); written back."""
    table = json.loads(path.read_text()) if path.exists() else {}
    for cls, cfg in tuned.items():
        table[cls] = {**table.get(cls, {}), **cfg}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1) + "\n")
    return table


@register_bench("tune", TuneBench)
def tune(
    out: str = "",
    shapes: Sequence[str] = tuple(SHAPES),
    classes: Sequence[str] = CLASSES,
    backward: bool = False,
) -> dict[str, Any]:
    """Search configs per shape class on this GPU; merge them into the user's config cache.

    Each class is written as soon as it is tuned, so a run cut short keeps what it found.
    """
    from moekit.backends.triton.configs import tuned_table

    path, table = tune_path(out), {}
    for cls in classes:
        start = time.perf_counter()
        tuned = _tune_forward(cls, shapes)
        if backward:
            for (_, kind), (_, cfg) in _search_backward([cls], shapes, {cls: tuned}).items():
                tuned[kind] = cfg
        table = merge_tuned(path, {cls: tuned})
        tuned_table.cache_clear()
        print(f"tuned {cls} in {time.perf_counter() - start:.0f} s -> {path}", flush=True)
    return {"configs": table, "files": [str(path)]}


def _tune_forward(cls: str, shapes: Sequence[str]) -> dict:
    """block_m, up and down configs of one shape class: the fastest summed over the shapes."""
    from triton.testing import do_bench

    from moekit.backends.triton.align import schedule
    from moekit.backends.triton.up import Tiles, gemm_down, gemm_up

    cases = []
    for name in shapes:
        x, w1, w2, _, _, plan = setup(shape_of(name), tune_tokens(cls, name), torch.bfloat16)
        a = torch.randn(plan.token_S.shape[0], shape_of(name)["H"], device="cuda").bfloat16()
        cases.append((x, w1, w2, a, plan))
    best: dict[tuple[int, str], tuple[float, dict]] = {}
    for block_m, cfg in _candidates(cls):
        for kernel in ("up", "down"):
            total = 0.0
            try:
                for x, w1, w2, a, plan in cases:
                    S = plan.token_S.shape[0]
                    tiles = Tiles(plan.offsets_E1, block_m, *schedule(plan.offsets_E1, S, block_m))
                    if kernel == "up":
                        fn = partial(gemm_up, x, w1, None, tiles, cfg, "swiglu", plan.token_S)
                    else:
                        fn = partial(gemm_down, a, w2, None, tiles, cfg)
                    total += float(do_bench(fn, warmup=5, rep=30, return_mode="median"))
            except Exception as err:  # configs past the shared-memory limit fail to compile
                print(f"tune {cls} {kernel} bm={block_m} {cfg}: {type(err).__name__}")
                continue
            print(f"tune {cls} {kernel} bm={block_m} {cfg}: {total:.4f} ms", flush=True)
            if total < best.get((block_m, kernel), (float("inf"), {}))[0]:
                best[(block_m, kernel)] = (total, cfg)
    block_ms = {bm for bm, _ in best if (bm, "up") in best and (bm, "down") in best}
    pick = min(block_ms, key=lambda bm: best[(bm, "up")][0] + best[(bm, "down")][0])
    tuned = {"block_m": pick, "up": best[(pick, "up")][1], "down": best[(pick, "down")][1]}
    print(f"tuned {cls}: {tuned}", flush=True)
    return tuned


@register_bench("tune-backward", TuneBackwardBench)
def tune_backward(
    classes: Sequence[str] = ("large", "medium"), out_dir: str | None = DEFAULT_DIR
) -> dict[str, Any]:
    """Time backward kernel configs (dh, dx, wgrad) per shape class; report the best of each."""
    best = _search_backward(classes, tuple(SHAPES), {})
    rows = [(cls, kind, f"{total:.4f}", cfg) for (cls, kind), (total, cfg) in best.items()]
    return write_report(
        "tune-backward",
        "Fastest backward kernel configs per shape class (bf16)",
        bench_command("tune-backward", classes=list(classes)),
        [Table(("shape class", "kernel", "ms (sum over shapes)", "config"), rows)],
        {"best": [{"class": c, "kernel": k, "ms": t, "config": cfg} for c, k, t, cfg in rows]},
        config={"classes": list(classes)},
        device="cuda",
        text=["Median ms of triton.testing.do_bench, summed over the shapes of each class."],
        out_dir=out_dir,
    )


def _search_backward(
    classes: Sequence[str], shapes: Sequence[str], forward: dict[str, dict]
) -> dict[tuple[str, str], tuple[float, dict]]:
    """{(class, kernel): (ms summed over shapes, config)} for dh, dx and wgrad; the tile height
    is the class's block_m from `forward` when it was just tuned, else the loaded one."""
    import triton
    from triton.testing import do_bench

    from moekit.backends.triton import backward as bw
    from moekit.backends.triton.align import schedule
    from moekit.backends.triton.configs import config_by_key
    from moekit.backends.triton.up import Tiles, gemm_dx

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
        for name in shapes:
            x, w1, w2, _, _, plan = setup(shape_of(name), tune_tokens(cls, name), torch.bfloat16)
            S, H = plan.token_S.shape[0], shape_of(name)["H"]
            h1 = torch.randn(S, 2 * H, device="cuda").bfloat16()
            cases.append((x, w1, w2, h1, torch.randn_like(x), plan))
        block_m = (forward.get(cls) or config_by_key(torch.device("cuda"), cls))["block_m"]
        for kind, grid in (("dh", gemms), ("dx", gemms), ("wgrad", wgrads)):
            for values in grid:
                cfg = dict(zip(wkeys if kind == "wgrad" else gemm_keys, values, strict=True))
                total = 0.0
                try:
                    for x, w1, w2, h1, dy, plan in cases:
                        S, off = plan.token_S.shape[0], plan.offsets_E1
                        sched = schedule(off, S, block_m)
                        if kind == "dx":
                            fn = partial(gemm_dx, h1, w1, Tiles(off, block_m, *sched), cfg)
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
    return best


def _short(kernel: str, width: int = 64) -> str:
    """A kernel name cut for a table cell (C++ template names run to thousands of characters)."""
    return kernel if len(kernel) <= width else kernel[: width - 3] + "..."


@register_bench("profile", ProfileBench)
def profile(
    shapes: Sequence[str] = tuple(SHAPES), tokens: int = 4096, out_dir: str | None = DEFAULT_DIR
) -> dict[str, Any]:
    """Per-kernel CUDA time of one triton fwd+bwd per shape (torch.profiler), as a report."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    tables, results = [], {}
    for name in shapes:
        x, w1, w2, _, weights, plan = setup(shape_of(name), tokens, torch.bfloat16)
        leaves = [t.detach().requires_grad_() for t in (x, w1, w2, weights)]
        fn = get_backend("triton", x.device, x.dtype)

        def step(leaves=leaves, plan=plan, fn=fn) -> None:
            xl, w1l, w2l, wl = leaves
            used = dataclasses.replace(plan, weight_S=wl.reshape(-1)[plan.order_S])
            y = fn.forward(xl, used, ExpertWeights(w1l, w2l), "swiglu")
            torch.autograd.grad(y, leaves, torch.ones_like(y))

        step()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
        kernels = [
            {"kernel": e.key, "calls": e.count, "cuda_ms": e.device_time_total / 1e3}
            for e in events[:_PROFILE_ROWS]
        ]
        results[name] = kernels
        rows = [(_short(k["kernel"]), k["calls"], f"{k['cuda_ms']:.3f}") for k in kernels]
        tables.append(Table(("kernel", "calls", "CUDA ms"), rows, title=f"{name} T={tokens}"))
    return write_report(
        "profile",
        "Per-kernel CUDA time of one triton fwd+bwd (bf16, SwiGLU)",
        bench_command("profile", shapes=list(shapes), tokens=tokens),
        tables,
        {"kernels": results},
        config={"shapes": list(shapes), "tokens": tokens},
        device="cuda",
        text=[
            f"torch.profiler, CUDA activity; the {_PROFILE_ROWS} longest kernels per shape "
            "(full names in the .json)."
        ],
        out_dir=out_dir,
    )
