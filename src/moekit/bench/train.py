"""`moekit bench train`: a real-size MoE training step, moekit against the stacks users run.

Every contender trains the same shape (`moekit.bench.train_models`) on the same GPU in the
same run: bf16 autocast over float32 master weights, fused AdamW, gradient clipping. moekit
runs its own `TrainStep` (triton or grouped_mm backend, optionally torch.compile'd and with
activation checkpointing); Hugging Face runs the family's model with the usual loop
(`model(input_ids, labels=...)`, `loss.backward()`, `optimizer.step()`).

Reported per contender: step time, tokens/s, achieved TFLOP/s and MFU (`flops_per_token` over
the bf16 matmul peak this GPU reaches, measured here) and peak memory; optionally the largest
batch that fits. A contender that fails gets its error in the table and the others still run.
"""

from __future__ import annotations

import gc
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from moekit.bench.registry import bench_command, option, register_bench
from moekit.bench.report import DEFAULT_DIR, Table, write_report
from moekit.bench.train_models import SHAPES, flops_per_token, hf_model, moekit_model
from moekit.model import ModelConfig
from moekit.train.config import CHECKPOINTING, TrainConfig
from moekit.train.metrics import model_loss
from moekit.train.optim import build_optimizer
from moekit.train.recompute import checkpoint_activations
from moekit.train.step import Precision, StepConfig, TrainStep

CONTENDER = re.compile(r"^(moekit|hf):(\w+)$")  # moekit:BACKEND or hf:EXPERTS_IMPL
DEFAULT_CONTENDERS = ["moekit:triton", "moekit:grouped_mm", "hf:grouped_mm"]
Step = Callable[[], None]
TARGETS = (
    "Targets: MFU of moekit:triton >= 1.3x moekit:grouped_mm's and >= 1.5x "
    "hf:grouped_mm's at the same shape; peak memory <= moekit:grouped_mm's at equal batch."
)


@dataclass
class TrainBench:
    """Training step time, tokens/s, MFU and peak memory: moekit vs grouped_mm and HF peers."""

    device: str = option("cuda", "cuda[:N], or cpu to exercise the harness (tiny shape)")
    shapes: list[str] = option(["qwen3-30b-a3b"], f"model shapes, from {list(SHAPES)}")
    layers: int = option(0, "layers of every shape (0 = the shape's default)")
    batch_size: int = option(4, "sequences per step")
    seq_len: int = option(2048, "tokens per sequence")
    contenders: list[str] = option(DEFAULT_CONTENDERS, "moekit:BACKEND and hf:EXPERTS_IMPL")
    checkpointing: list[str] = option(["none"], f"activation checkpointing, from {CHECKPOINTING}")
    compile: bool = option(True, "torch.compile the moekit models (whole model)")
    hf_compile: bool = option(False, "torch.compile the Hugging Face models too")
    steps: int = option(10, "timed optimiser steps")
    warmup: int = option(3, "untimed steps first (compilation happens here)")
    max_batch: int = option(0, "also find the largest batch that fits, doubling up to this")
    out_dir: str = option(DEFAULT_DIR, "directory of the .md and .json ('' writes none)")

    def __post_init__(self) -> None:
        if not self.device.startswith(("cpu", "cuda")):
            raise ValueError(f"device={self.device!r} must be cpu or cuda[:N]")
        unknown = sorted(set(self.shapes) - set(SHAPES))
        if unknown or not self.shapes:
            raise ValueError(f"shapes={self.shapes} must be a non-empty subset of {list(SHAPES)}")
        bad = [c for c in self.contenders if not CONTENDER.match(c)]
        if bad or not self.contenders:
            raise ValueError(f"contenders={self.contenders}: each is moekit:BACKEND or hf:IMPL")
        bad = sorted(set(self.checkpointing) - set(CHECKPOINTING))
        if bad or not self.checkpointing:
            raise ValueError(
                f"checkpointing={self.checkpointing} must be a subset of {CHECKPOINTING}"
            )
        for name in ("batch_size", "seq_len", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("layers", "warmup", "max_batch"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")


def _sync(device: torch.device) -> None:
    """NOTE: host sync: wait for the device (timing only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(device: torch.device) -> dict[str, Any]:
    """The matmul peak this device reaches: bf16 8192^3 on CUDA, float32 1024^3 on a CPU."""
    cuda = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(13):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 3:  # warm-up first
            times.append(time.perf_counter() - start)
    tflops = 2 * n**3 / statistics.median(times) / 1e12
    return {"tflops": tflops, "dtype": str(dtype).removeprefix("torch."), "n": n}


def _free(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _tokens(cfg: ModelConfig, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=gen).to(device)


def moekit_step(
    cfg: ModelConfig, device: torch.device, batch: int, seq_len: int, mode: str, compiled: bool
) -> Step:
    """One moekit optimiser step on fixed random tokens: the trainer's TrainStep and AdamW."""
    model = moekit_model(cfg, device)
    checkpoint_activations(model, mode)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.0))
    precision = Precision.BF16 if device.type == "cuda" else Precision.FP32
    step = TrainStep(model, StepConfig(precision=precision, max_grad_norm=1.0))
    forward = torch.compile(model) if compiled else model
    data = _tokens(cfg, batch, seq_len, device)
    x, y = data[:, :-1], data[:, 1:]
    return lambda: step(
        optimizer, [None], lambda _: forward(x, y), lambda out, _: model_loss(out, None)
    )


def hf_step(
    cfg: ModelConfig,
    family: str,
    experts: str,
    device: torch.device,
    batch: int,
    seq_len: int,
    mode: str,
    compiled: bool,
) -> Step:
    """One step of the loop users write around a transformers model: autocast, backward, clip,
    fused AdamW; `blocks` is transformers' gradient checkpointing."""
    model = hf_model(cfg, family, experts, device)
    model.train()
    if mode == "blocks":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, **fused)
    forward = torch.compile(model) if compiled else model
    ids = _tokens(cfg, batch, seq_len, device)[:, :-1]  # transformers shifts the labels itself
    cast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with cast:
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def _time(step: Step, device: torch.device, warmup: int, steps: int) -> dict[str, float]:
    """Mean step time over `steps` after `warmup` steps, and the peak memory while timed."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"step_s": seconds, "peak_gib": peak}


def _build(name: str, shape_family: str, cfg: ModelConfig, dev: torch.device, batch: int,
           seq_len: int, mode: str, opts: TrainBench) -> Step:  # fmt: skip
    kind, impl = CONTENDER.match(name).groups()  # type: ignore[union-attr]
    if kind == "moekit":
        cfg = replace(cfg, moe=replace(cfg.moe, backend=impl))  # validated: names the backend
        return moekit_step(cfg, dev, batch, seq_len, mode, opts.compile)
    if mode == "experts":
        raise ValueError("transformers has no experts-only checkpointing")
    return hf_step(cfg, shape_family, impl, dev, batch, seq_len, mode, opts.hf_compile)


def _error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160] if text else ''}"


def bench_contender(name: str, shape_name: str, mode: str, opts: TrainBench,
                    peak_tflops: float) -> dict[str, Any]:  # fmt: skip
    """Time one contender on one shape; errors (out of memory included) become the row's note."""
    shape, dev = SHAPES[shape_name], torch.device(opts.device)
    layers = opts.layers or shape.layers
    cfg = shape.model_config(layers, opts.seq_len, "auto")
    row: dict[str, Any] = {"shape": shape_name, "layers": layers, "contender": name}
    row |= {"checkpointing": mode, "batch": opts.batch_size, "seq_len": opts.seq_len}
    row["compiled"] = opts.compile if name.startswith("moekit") else opts.hf_compile
    _free(dev)
    try:
        step = _build(name, shape.family, cfg, dev, opts.batch_size, opts.seq_len, mode, opts)
        row |= _time(step, dev, opts.warmup, opts.steps)
    except Exception as err:  # a failing peer must not hide the other rows
        row["error"] = _error(err)
        return row
    finally:
        step = None  # type: ignore[assignment]
        _free(dev)
    tokens = opts.batch_size * opts.seq_len
    row["tokens_per_s"] = tokens / row["step_s"]
    row["tflops"] = flops_per_token(cfg, opts.seq_len) * row["tokens_per_s"] / 1e12
    row["mfu"] = row["tflops"] / peak_tflops
    return row


def largest_batch(name: str, shape_name: str, mode: str, opts: TrainBench) -> dict[str, Any]:
    """Double the batch from `batch_size` while two steps fit, up to `max_batch`."""
    shape, dev = SHAPES[shape_name], torch.device(opts.device)
    cfg = shape.model_config(opts.layers or shape.layers, opts.seq_len, "auto")
    fits, batch, error = 0, opts.batch_size, ""
    while batch <= opts.max_batch:
        _free(dev)
        try:
            step = _build(name, shape.family, cfg, dev, batch, opts.seq_len, mode, opts)
            step()
            step()
            _sync(dev)
            fits, batch = batch, batch * 2
        except Exception as err:  # out of memory may surface wrapped by the compiler
            if not isinstance(err, torch.OutOfMemoryError) and "out of memory" not in str(err):
                error = _error(err)
            break
        finally:
            step = None  # type: ignore[assignment]
            _free(dev)
    return {"shape": shape_name, "contender": name, "checkpointing": mode, "fits": fits,
            "limit": opts.max_batch, "error": error}  # fmt: skip


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _table(rows: list[dict]) -> Table:
    columns = ("shape", "contender", "ckpt", "compiled", "batch x seq", "step ms", "tokens/s")
    table = Table((*columns, "TFLOP/s", "MFU", "peak GiB", "note"))
    for r in rows:
        ok = "error" not in r
        table.rows.append(
            (
                f"{r['shape']} ({r['layers']}L)",
                r["contender"],
                r["checkpointing"],
                "yes" if r["compiled"] else "no",
                f"{r['batch']} x {r['seq_len']}",
                _fmt(r["step_s"] * 1e3, ".1f") if ok else "",
                _fmt(r.get("tokens_per_s"), ",.0f"),
                _fmt(r.get("tflops"), ".3g"),
                _fmt(100 * r["mfu"], ".3g") + "%" if ok else "",
                _fmt(r.get("peak_gib"), ".1f"),
                r.get("error", ""),
            )
        )
    return table


def ratios(rows: list[dict], lead: str = "moekit:triton") -> list[str]:
    """MFU of `lead` over each other contender at the same shape and checkpointing."""
    lines = []
    ok = [r for r in rows if "mfu" in r]
    for r in ok:
        if r["contender"] != lead:
            continue
        for other in ok:
            same = (other["shape"], other["checkpointing"]) == (r["shape"], r["checkpointing"])
            if same and other["contender"] != lead:
                lines.append(
                    f"{r['shape']}, checkpointing {r['checkpointing']}: MFU of {lead} is "
                    f"{r['mfu'] / other['mfu']:.2f}x {other['contender']}'s"
                )
    return lines


@register_bench("train", TrainBench)
def run(
    device: str = "cuda",
    shapes: Sequence[str] = ("qwen3-30b-a3b",),
    layers: int = 0,
    batch_size: int = 4,
    seq_len: int = 2048,
    contenders: Sequence[str] = tuple(DEFAULT_CONTENDERS),
    checkpointing: Sequence[str] = ("none",),
    compile: bool = True,
    hf_compile: bool = False,
    steps: int = 10,
    warmup: int = 3,
    max_batch: int = 0,
    out_dir: str | None = DEFAULT_DIR,
) -> dict[str, Any]:
    """Times every contender x shape x checkpointing mode; writes the report and returns it."""
    values = dict(locals())
    opts = TrainBench(**{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()})
    dev = torch.device(device)
    peak = measure_peak(dev)
    rows, fits = [], []
    for shape in shapes:
        for mode in checkpointing:
            for name in contenders:
                rows.append(bench_contender(name, shape, mode, opts, peak["tflops"]))
                if max_batch:
                    fits.append(largest_batch(name, shape, mode, opts))
    cuda = dev.type == "cuda"
    precision = "bf16 autocast" if cuda else "float32"
    adamw = "fused AdamW" if cuda else "AdamW"
    tables = [_table(rows)]
    if fits:
        fit_table = Table(("shape", "contender", "ckpt", "largest batch that fits", "note"))
        fit_table.title = f"largest batch (doubling from {batch_size}, up to {max_batch})"
        for f in fits:
            fit_table.rows.append(
                (f["shape"], f["contender"], f["checkpointing"], f["fits"], f["error"])
            )
        tables.append(fit_table)
    text = [
        f"Matmul peak measured here: {peak['tflops']:.3g} TFLOP/s ({peak['dtype']}, "
        f"{peak['n']}^3); MFU = model FLOPs per token x tokens/s / that peak. FLOPs per token: "
        "6 x active matmul weights (experts k of E, router, LM head; no embedding) + "
        "12 x layers x heads x head_dim x seq_len (PaLM; attention without the causal half).",
        f"{precision} over float32 master weights, {adamw}, grad clip 1.0; mean step time "
        f"over {steps} steps after {warmup} warm-up steps; peak memory while timed.",
    ]
    shown = {k: v for k, v in values.items() if k != "out_dir"}
    return write_report(
        f"train-{dev.type}",
        f"MoE training step at size, {dev.type}",
        bench_command(
            "train", **{k: list(v) if isinstance(v, tuple) else v for k, v in shown.items()}
        ),
        tables,
        {"rows": rows, "largest_batch": fits, "peak": peak, "ratios": ratios(rows)},
        config=opts,
        device=device,
        text=text,
        notes=[*ratios(rows), TARGETS] if ratios(rows) else [],
        out_dir=out_dir,
    )
