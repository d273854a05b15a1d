"""Expert-parallel layer throughput: EP over all ranks vs the whole layer on one device.

Launched by torchrun, one process per GPU (NCCL), or on CPU with gloo for a smoke run:

    torchrun --nproc-per-node 2 -m moekit.bench.expert_parallel            # E128 k8 D2048 H768
    torchrun --nproc-per-node 2 -m moekit.bench.expert_parallel --small --out ""   # CPU check

Each rank gets T tokens (random, fixed seed per rank) and one shared random router. First
the EP layer is checked against `moekit.MoE` on the same tokens (max relative error of y and
x.grad). Then: forward and forward + backward of the single-device layer (each rank alone,
no communication) and of the EP layer; a step's time is the slowest rank's. tokens/s per
device = T / step time. Rank 0 writes docs/benchmarks/ep-<gpu>-<date>.md and .json.
Shape legend: T tokens per rank, E experts, K experts per token, D model dim, H expert hidden.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from moekit import MoE, MoEConfig
from moekit.bench.timing import cpu_description
from moekit.parallel import ExpertParallelMoE

FULL = {"E": 128, "K": 8, "D": 2048, "H": 768, "T": 8192}  # Qwen3-30B-A3B-sized layer
SMALL = {"E": 8, "K": 2, "D": 64, "H": 32, "T": 256}


def _sync_step_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int):
    """Median over repeats of the slowest rank's time for fn().

    NOTE: host sync — timing waits for the device and gathers the times.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return statistics.median(slowest.tolist())


def _sync_rel_err(got: Tensor, want: Tensor) -> float:
    """Max |got - want| / max |want| over all ranks. NOTE: host sync (one check, not timed)."""
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).reshape(1)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    return float(err.item())


def _fwd_bwd(layer: torch.nn.Module, x: Tensor, dy: Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        y, info = layer(x)
        torch.autograd.backward((y, info.aux_loss), (dy, torch.ones_like(info.aux_loss)))

    return step


def run(shape: dict[str, int], dtype: torch.dtype, backend: str, repeats: int) -> dict:
    """Check EP against the dense layer, then time both; returns the report (all ranks)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    E, K, D, H, T = (shape[k] for k in ("E", "K", "D", "H", "T"))
    cfg = MoEConfig(d_model=D, d_hidden=H, n_experts=E, k=K, backend=backend)
    torch.manual_seed(0)  # the same dense layer on every rank
    dense = MoE(cfg).to(device, dtype)
    ep = ExpertParallelMoE.from_dense(dense)
    gen = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(T, D, generator=gen).to(device, dtype).requires_grad_()
    dy = torch.randn(T, D, generator=gen).to(device, dtype)

    checks = {}
    for name, layer in (("dense", dense), ("ep", ep)):
        x.grad = None
        y, info = layer(x)
        torch.autograd.backward((y, info.aux_loss), (dy, torch.ones_like(info.aux_loss)))
        checks[name] = (y.detach(), x.grad.clone())
    accuracy = {
        "y_rel_err": _sync_rel_err(checks["ep"][0], checks["dense"][0]),
        "x_grad_rel_err": _sync_rel_err(checks["ep"][1], checks["dense"][1]),
    }
    del checks

    rows = []
    warmup = 3
    for name, layer in (("single device", dense), (f"EP={world}", ep)):
        with torch.no_grad():
            fwd_ms = _sync_step_ms(lambda layer=layer: layer(x), device, warmup, repeats)
        step_ms = _sync_step_ms(_fwd_bwd(layer, x, dy), device, warmup, repeats)
        rows.append(
            {
                "layer": name,
                "forward_ms": fwd_ms,
                "fwd_bwd_ms": step_ms,
                "tokens_per_s_per_device": {
                    "forward": T / fwd_ms * 1e3,
                    "fwd_bwd": T / step_ms * 1e3,
                },
            }
        )
    return {
        "date": dt.date.today().isoformat(),
        "machine": {
            "device": (
                torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()
            ),
            "world_size": world,
            "host": platform.node(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "dist_backend": dist.get_backend(),
        },
        "shape": shape,
        "dtype": str(dtype).removeprefix("torch."),
        "backend": backend,
        "repeats": repeats,
        "accuracy": accuracy,
        "rows": rows,
    }


def _markdown(report: dict, command: str) -> str:
    m, s = report["machine"], report["shape"]
    lines = [
        f"# Expert-parallel layer, {m['device']} x{m['world_size']}, {report['date']}",
        "",
        f"`{command}` — torch {m['torch']}, CUDA {m['cuda']}, {m['dist_backend']}, "
        f"{report['dtype']}, backend={report['backend']}, median of {report['repeats']} steps "
        "(a step's time is its slowest rank's).",
        "",
        f"Layer: E={s['E']} k={s['K']} D={s['D']} H={s['H']}, T={s['T']} tokens per device.",
        f"EP vs `moekit.MoE` on the same tokens: y rel. err {report['accuracy']['y_rel_err']:.2e}, "
        f"x.grad rel. err {report['accuracy']['x_grad_rel_err']:.2e}.",
        "",
        "| layer | forward ms | fwd+bwd ms | tokens/s/device fwd | tokens/s/device fwd+bwd |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        tps = r["tokens_per_s_per_device"]
        lines.append(
            f"| {r['layer']} | {r['forward_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
            f"{tps['forward']:,.0f} | {tps['fwd_bwd']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="expert-parallel layer benchmark (torchrun)")
    parser.add_argument("--small", action="store_true", help="tiny layer: a quick CPU/GPU check")
    parser.add_argument("--tokens", type=int, default=None, help="T per device")
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float32"))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="docs/benchmarks", help="'' to write nothing")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    shape = dict(SMALL if args.small else FULL)
    if args.tokens:
        shape["T"] = args.tokens
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    report = run(shape, dtype, args.backend, args.repeats)
    command = "torchrun --nproc-per-node {} -m moekit.bench.expert_parallel {}".format(
        report["machine"]["world_size"], " ".join(sys.argv[1:] if argv is None else argv)
    ).strip()
    if dist.get_rank() == 0:
        print(_markdown(report, command), flush=True)
        if args.out:
            name = re.sub(r"[^A-Za-z0-9]+", "-", report["machine"]["device"]).strip("-")
            stem = Path(args.out) / f"ep-{name}-{report['date']}"
            stem.parent.mkdir(parents=True, exist_ok=True)
            stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
            stem.with_suffix(".md").write_text(_markdown(report, command))
            print(f"wrote {stem}.md and .json")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
