"""Expert-parallel layer throughput: EP over all ranks vs the whole layer on one device.

Launched by torchrun, one process per GPU (NCCL), or on CPU with gloo for a smoke run:

    torchrun --nproc-per-node 2 -m moekit.cli bench expert-parallel      # E128 k8 D2048 H768
    torchrun --nproc-per-node 2 -m moekit.cli bench expert-parallel --small --out-dir ""

Each rank gets T tokens (random, fixed seed per rank) and one shared random router. First
the EP layer is checked against `moekit.MoE` on the same tokens (max relative error of y and
x.grad). Then: forward and forward + backward of the single-device layer (each rank alone,
no communication) and of the EP layer; a step's time is the slowest rank's. tokens/s per
device = T / step time. Then the layer's token all-to-all alone (its real split sizes) against
an evenly split all-to-all of the same bytes: time, bus bandwidth and their ratio. Rank 0
writes moekit-out/benchmarks/expert-parallel-x<R>-<machine>-<date>.md and .json.
Shape legend: T tokens per rank, E experts, K experts per token, D model dim, H expert hidden.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from moekit.bench.registry import bench_command, option, register_bench
from moekit.bench.report import DEFAULT_DIR, Table, write_report
from moekit.config import MoEConfig
from moekit.layer import MoE
from moekit.parallel import ExpertParallelMoE
from moekit.parallel.comm import _sync_split_sizes

FULL = {"E": 128, "K": 8, "D": 2048, "H": 768, "T": 8192}  # Qwen3-30B-A3B-sized layer
SMALL = {"E": 8, "K": 2, "D": 64, "H": 32, "T": 256}
DTYPES = ("auto", "bfloat16", "float32")


@dataclass
class ExpertParallelBench:
    """Expert-parallel layer vs the whole layer on one device (launch under torchrun)."""

    small: bool = option(False, "a tiny layer: a quick CPU (gloo) or GPU check")
    tokens: int = option(0, "tokens T per device; 0 = the shape's own")
    dtype: str = option("auto", "bfloat16 or float32; auto = bfloat16 on CUDA, else float32")
    backend: str = option("auto", "expert backend of both layers")
    repeats: int = option(20, "timed steps; the median is reported")
    out_dir: str = option(DEFAULT_DIR, "directory of rank 0's .md and .json ('' writes none)")

    def __post_init__(self) -> None:
        if self.tokens < 0:
            raise ValueError(f"tokens={self.tokens} must be >= 0")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {DTYPES}")
        if self.repeats < 1:
            raise ValueError(f"repeats={self.repeats} must be >= 1")


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


def _exchange(x_ND: Tensor, send_R: list[int], recv_R: list[int]) -> Callable[[], None]:
    out = x_ND.new_empty((sum(recv_R), x_ND.shape[1]))
    return lambda: dist.all_to_all_single(
        out, x_ND, output_split_sizes=recv_R, input_split_sizes=send_R
    )


def _sync_max(value: int, device: torch.device) -> int:
    """The largest value over ranks. NOTE: host sync (set-up, not timed)."""
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_to_all_stats(ep: ExpertParallelMoE, x: Tensor, repeats: int) -> dict[str, Any]:
    """The layer's token exchange alone vs an evenly split all-to-all of the same size.

    Bytes are the largest rank's sent rows; bus bandwidth is bytes * (R - 1) / R / time, as
    nccl-tests reports all-to-all. A forward + backward step runs four such exchanges.
    """
    R, device = dist.get_world_size(), x.device
    with torch.no_grad():
        _, plan = ep.route(x.detach())
    counts_RL = plan.counts_E.view(R, ep.dispatcher.n_local)
    send_R, recv_R, _ = _sync_split_sizes(counts_RL, None)
    rows = _sync_max(sum(send_R), device)
    even = -(-rows // R)  # every rank sends the largest rank's rows, split evenly
    bytes_per_rank = rows * x.shape[1] * x.element_size()
    x_ND = x.detach()[plan.token_S[: sum(send_R)]].contiguous()
    layer_ms = _sync_step_ms(_exchange(x_ND, send_R, recv_R), device, 3, repeats)
    x_even = x.detach().new_zeros((even * R, x.shape[1]))
    even_ms = _sync_step_ms(_exchange(x_even, [even] * R, [even] * R), device, 3, repeats)

    def busbw(ms: float, nbytes: int) -> float:
        return nbytes * (R - 1) / R / (ms * 1e-3) / 1e9

    even_bytes = even * R * x.shape[1] * x.element_size()
    layer_bw, even_bw = busbw(layer_ms, bytes_per_rank), busbw(even_ms, even_bytes)
    return {
        "bytes_per_rank": bytes_per_rank,
        "even_bytes_per_rank": even_bytes,
        "layer_exchange_ms": layer_ms,
        "even_exchange_ms": even_ms,
        "layer_busbw_GBps": layer_bw,
        "even_busbw_GBps": even_bw,
        "fraction_of_even": layer_bw / even_bw if even_bw else 0.0,
    }


def _fwd_bwd(layer: torch.nn.Module, x: Tensor, dy: Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        y, info = layer(x)
        torch.autograd.backward((y, info.aux_loss), (dy, torch.ones_like(info.aux_loss)))

    return step


def measure(shape: dict[str, int], dtype: torch.dtype, backend: str, repeats: int) -> dict:
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
    exchange = all_to_all_stats(ep, x, repeats) if world > 1 else None
    return {
        "exchange": exchange,
        "device": device.type,
        "world_size": world,
        "dist_backend": dist.get_backend(),
        "shape": shape,
        "dtype": str(dtype).removeprefix("torch."),
        "backend": backend,
        "repeats": repeats,
        "accuracy": accuracy,
        "rows": rows,
    }


def _exchange_table(ex: dict) -> Table:
    table = Table(("exchange", "MB per rank", "ms", "bus GB/s"))
    for name, key in (("layer's token all-to-all", "layer"), ("even all-to-all", "even")):
        nbytes = ex["bytes_per_rank"] if key == "layer" else ex["even_bytes_per_rank"]
        table.rows.append(
            (name, f"{nbytes / 1e6:.2f}", f"{ex[f'{key}_exchange_ms']:.3f}")
            + (f"{ex[f'{key}_busbw_GBps']:.1f}",)
        )
    return table


def _summary(result: dict) -> list[str]:
    """The targets, read off the measurement (not asserted): step time per token over all
    devices relative to one device's, and the exchange's share of an even all-to-all's rate."""
    single, ep = result["rows"]
    per_token = ep["fwd_bwd_ms"] / (result["world_size"] * single["fwd_bwd_ms"])
    lines = [
        f"EP fwd+bwd time per token (all devices) / one device's: {per_token:.2f} (target <= 0.6)."
    ]
    if result["exchange"] is not None:
        frac = result["exchange"]["fraction_of_even"]
        lines.append(
            f"Layer exchange bus bandwidth / even all-to-all's: {frac:.2f} (target >= 0.7)."
        )
    return lines


def _table(report: dict) -> Table:
    columns = ("layer", "forward ms", "fwd+bwd ms", "tokens/s/device fwd")
    table = Table((*columns, "tokens/s/device fwd+bwd"))
    for r in report["rows"]:
        tps = r["tokens_per_s_per_device"]
        table.rows.append(
            (r["layer"], f"{r['forward_ms']:.2f}", f"{r['fwd_bwd_ms']:.2f}")
            + (f"{tps['forward']:,.0f}", f"{tps['fwd_bwd']:,.0f}")
        )
    return table


@register_bench("expert-parallel", ExpertParallelBench)
def run(
    small: bool = False,
    tokens: int = 0,
    dtype: str = "auto",
    backend: str = "auto",
    repeats: int = 20,
    out_dir: str | None = DEFAULT_DIR,
) -> dict[str, Any]:
    """Join the torchrun process group, measure, and have rank 0 write the report."""
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        shape = dict(SMALL if small else FULL)
        if tokens:
            shape["T"] = tokens
        auto = "bfloat16" if cuda else "float32"
        result = measure(
            shape, getattr(torch, auto if dtype == "auto" else dtype), backend, repeats
        )
        if dist.get_rank() != 0:
            return {**result, "files": []}
        s, acc = result["shape"], result["accuracy"]
        options = {"small": small, "tokens": tokens, "dtype": dtype, "backend": backend}
        options["repeats"] = repeats
        world = result["world_size"]
        return write_report(
            f"expert-parallel-x{world}",
            f"Expert-parallel layer, {world} ranks ({result['dist_backend']})",
            f"torchrun --nproc-per-node {world} -m moekit.cli "
            + bench_command("expert-parallel", **options).removeprefix("moekit "),
            [_table(result)]
            + ([_exchange_table(result["exchange"])] if result["exchange"] else []),
            result,
            config=options,
            device=result["device"],
            text=[
                f"Layer: E={s['E']} k={s['K']} D={s['D']} H={s['H']}, T={s['T']} tokens per "
                f"device, {result['dtype']}, backend={backend}; median of {repeats} steps (a "
                "step's time is its slowest rank's). EP vs `moekit.MoE` on the same tokens: "
                f"y rel. err {acc['y_rel_err']:.2e}, x.grad rel. err {acc['x_grad_rel_err']:.2e}.",
                *_summary(result),
            ],
            out_dir=out_dir,
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    from moekit.cli import main

    raise SystemExit(main(["bench", "expert-parallel", *sys.argv[1:]]))
