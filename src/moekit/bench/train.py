"""`moekit bench train`: a real-size MoE training step, moekit against the stacks users run.

Every contender trains the same shape (`moekit.bench.train_models`) on the same GPU in the
same run: bf16 autocast over float32 master weights, fused AdamW, gradient clipping. moekit
runs its own `TrainStep` (triton or grouped_mm backend, torch.compile'd or eager, with
activation checkpointing); Hugging Face runs the family's model with the usual loop
(`model(input_ids, labels=...)`, `loss.backward()`, `optimizer.step()`).

Reported per contender: step time, tokens/s, achieved TFLOP/s and MFU (`flops_per_token` over
the bf16 matmul peak this GPU reaches, measured here) and peak memory; optionally the largest
batch that fits. A contender that fails gets its error in the table and the others still run.
The report is rewritten after every row, so a run stopped early keeps the rows it finished.
"""

from __future__ import annotations

import gc
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from moekit.bench.charts import Chart, grouped_bars
from moekit.bench.registry import bench_command, option, register_bench
from moekit.bench.report import DEFAULT_DIR, Table, write_report
from moekit.bench.train_models import SHAPES, Step, flops_per_token, hf_step, moekit_step
from moekit.model import ModelConfig
from moekit.train.config import CHECKPOINTING

# moekit:BACKEND or hf:EXPERTS_IMPL, optionally :compiled or :eager (else --compile decides)
CONTENDER = re.compile(r"^(moekit|hf):(\w+)(?::(compiled|eager))?$")
DEFAULT_CONTENDERS = ["moekit:triton", "moekit:grouped_mm", "hf:grouped_mm"]
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
    contenders: list[str] = option(
        DEFAULT_CONTENDERS, "moekit:BACKEND and hf:EXPERTS_IMPL, each optionally :compiled|:eager"
    )
    checkpointing: list[str] = option(["none"], f"activation checkpointing, from {CHECKPOINTING}")
    checkpointing_contenders: list[str] = option(
        [], "contenders timed under the checkpointing modes after the first ([]: all)"
    )
    compile: bool = option(True, "torch.compile the moekit models (whole model)")
    hf_compile: bool = option(False, "torch.compile the Hugging Face models too")
    steps: int = option(10, "timed optimiser steps")
    warmup: int = option(3, "untimed steps first (compilation happens here)")
    max_batch: int = option(0, "also find the largest batch that fits, doubling up to this")
    loss_chunk_tokens: int = option(0, "moekit models: LM loss in chunks of this many tokens")
    max_batch_contenders: list[str] = option(
        [], "contenders whose largest batch is searched, after every timed row ([]: all)"
    )
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
        for name in ("checkpointing_contenders", "max_batch_contenders"):
            extra = sorted(set(getattr(self, name)) - set(self.contenders))
            if extra:
                raise ValueError(f"{name}={extra} must be among contenders={self.contenders}")
        bad = sorted(set(self.checkpointing) - set(CHECKPOINTING))
        if bad or not self.checkpointing:
            raise ValueError(
                f"checkpointing={self.checkpointing} must be a subset of {CHECKPOINTING}"
            )
        for name in ("batch_size", "seq_len", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("layers", "warmup", "max_batch", "loss_chunk_tokens"):
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


def compiled(name: str, opts: TrainBench) -> bool:
    """Whether contender `name` runs torch.compile'd: its suffix, else --compile / --hf-compile."""
    kind, _, mode = CONTENDER.match(name).groups()  # type: ignore[union-attr]
    if mode is not None:
        return mode == "compiled"
    return opts.compile if kind == "moekit" else opts.hf_compile


def _build(name: str, shape_family: str, cfg: ModelConfig, dev: torch.device, batch: int,
           seq_len: int, mode: str, opts: TrainBench) -> Step:  # fmt: skip
    kind, impl, _ = CONTENDER.match(name).groups()  # type: ignore[union-attr]
    if kind == "moekit":
        moe = replace(cfg.moe, backend=impl)  # validated: names the backend
        cfg = replace(cfg, moe=moe, loss_chunk_tokens=opts.loss_chunk_tokens)
        return moekit_step(cfg, dev, batch, seq_len, mode, compiled(name, opts))
    if mode == "experts":
        raise ValueError("transformers has no experts-only checkpointing")
    return hf_step(cfg, shape_family, impl, dev, batch, seq_len, mode, compiled(name, opts))


def _chain(err: BaseException) -> list[BaseException]:
    """`err` and the errors it was raised from or while handling, outermost first."""
    chain = [err]
    while (inner := chain[-1].__cause__ or chain[-1].__context__) and inner not in chain:
        chain.append(inner)
    return chain


def _error(err: BaseException) -> str:
    """The error's type and first line, and its root cause's when the compiler wrapped it."""
    root = _chain(err)[-1]
    text = str(err).strip().splitlines()
    line = f"{type(err).__name__}: {text[0] if text else ''}"
    if root is not err:
        cause = str(root).strip().splitlines()
        line += f" ({type(root).__name__}: {cause[0] if cause else ''})"
    return line[:240]


def _base(name: str) -> str:
    """The contender without its :compiled / :eager suffix (the row says that instead)."""
    kind, impl, _ = CONTENDER.match(name).groups()  # type: ignore[union-attr]
    return f"{kind}:{impl}"


def bench_contender(name: str, shape_name: str, mode: str, opts: TrainBench,
                    peak_tflops: float) -> dict[str, Any]:  # fmt: skip
    """Time one contender on one shape; errors (out of memory included) become the row's note."""
    shape, dev = SHAPES[shape_name], torch.device(opts.device)
    layers = opts.layers or shape.layers
    cfg = shape.model_config(layers, opts.seq_len, "auto")
    row: dict[str, Any] = {"shape": shape_name, "layers": layers, "contender": _base(name)}
    row |= {"checkpointing": mode, "batch": opts.batch_size, "seq_len": opts.seq_len}
    row["compiled"] = compiled(name, opts)
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


def _out_of_memory(err: BaseException) -> bool:
    """Out of memory, also when the compiler or a kernel launcher wrapped it."""
    return any(
        isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        for e in _chain(err)
    )


def largest_batch(name: str, shape_name: str, mode: str, opts: TrainBench) -> dict[str, Any]:
    """Double the batch from `batch_size` while two steps fit, up to `max_batch`; the time of
    the second step and the peak memory of the largest batch that fit."""
    shape, dev = SHAPES[shape_name], torch.device(opts.device)
    cfg = shape.model_config(opts.layers or shape.layers, opts.seq_len, "auto")
    fit: dict[str, Any] = {"shape": shape_name, "contender": _base(name), "checkpointing": mode}
    fit |= {"compiled": compiled(name, opts), "fits": 0, "limit": opts.max_batch, "error": ""}
    batch = opts.batch_size
    while batch <= opts.max_batch:
        _free(dev)
        try:
            step = _build(name, shape.family, cfg, dev, batch, opts.seq_len, mode, opts)
            measured = _time(step, dev, 1, 1)
            fit |= {"fits": batch, "step_s": measured["step_s"], "peak_gib": measured["peak_gib"]}
            batch *= 2
        except Exception as err:
            if not _out_of_memory(err):
                fit["error"] = _error(err)
            break
        finally:
            step = None  # type: ignore[assignment]
            _free(dev)
    return fit


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


def _label(row: dict) -> str:
    return f"{row['contender']} (compiled)" if row.get("compiled") else row["contender"]


def ratios(rows: list[dict], lead: str = "moekit:triton") -> list[str]:
    """MFU of `lead` (compiled and eager) over each other contender at the same shape and
    checkpointing."""
    lines = []
    ok = [r for r in rows if "mfu" in r]
    for r in ok:
        if r["contender"] != lead:
            continue
        for other in ok:
            same = (other["shape"], other["checkpointing"]) == (r["shape"], r["checkpointing"])
            if same and other["contender"] != lead:
                lines.append(
                    f"{r['shape']}, checkpointing {r['checkpointing']}: MFU of {_label(r)} is "
                    f"{r['mfu'] / other['mfu']:.2f}x {_label(other)}'s"
                )
    return lines


def _fit_table(fits: list[dict], batch_size: int, max_batch: int) -> Table:
    columns = ("shape", "contender", "ckpt", "compiled", "largest batch that fits")
    table = Table((*columns, "step ms", "peak GiB", "note"))
    table.title = f"largest batch (doubling from {batch_size}, up to {max_batch})"
    for f in fits:
        step_ms = f["step_s"] * 1e3 if "step_s" in f else None
        table.rows.append(
            (
                f["shape"],
                f["contender"],
                f["checkpointing"],
                "yes" if f["compiled"] else "no",
                f["fits"],
                _fmt(step_ms, ".1f"),
                _fmt(f.get("peak_gib"), ".1f"),
                f["error"],
            )
        )
    return table


def plan_runs(opts: TrainBench) -> list[tuple[str, str, str, str]]:
    """(what, contender, shape, mode) in the order they run: the timed rows, per shape the
    first checkpointing mode for every contender, then the other modes; then the searches."""
    timed, searched = [], []
    again = opts.checkpointing_contenders or opts.contenders
    fit = opts.max_batch_contenders or opts.contenders
    for shape in opts.shapes:
        for i, mode in enumerate(opts.checkpointing):
            timed += [("time", name, shape, mode) for name in (again if i else opts.contenders)]
            if opts.max_batch:
                searched += [("fit", name, shape, mode) for name in fit]
    return timed + searched


@register_bench("train", TrainBench)
def run(
    device: str = "cuda",
    shapes: Sequence[str] = ("qwen3-30b-a3b",),
    layers: int = 0,
    batch_size: int = 4,
    seq_len: int = 2048,
    contenders: Sequence[str] = tuple(DEFAULT_CONTENDERS),
    checkpointing: Sequence[str] = ("none",),
    checkpointing_contenders: Sequence[str] = (),
    compile: bool = True,
    hf_compile: bool = False,
    steps: int = 10,
    warmup: int = 3,
    max_batch: int = 0,
    max_batch_contenders: Sequence[str] = (),
    loss_chunk_tokens: int = 0,
    out_dir: str | None = DEFAULT_DIR,
) -> dict[str, Any]:
    """Times the planned contender x shape x checkpointing rows, then the largest-batch
    searches; rewrites the report after each and returns the last."""
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in locals().items()}
    opts = TrainBench(**values)
    dev = torch.device(device)
    peak = measure_peak(dev)
    planned = plan_runs(opts)
    rows: list[dict] = []
    fits: list[dict] = []
    report: dict[str, Any] = {}
    for i, (what, name, shape, mode) in enumerate(planned, 1):
        if what == "time":
            rows.append(row := bench_contender(name, shape, mode, opts, peak["tflops"]))
        else:
            fits.append(row := largest_batch(name, shape, mode, opts))
        print(f"bench train {i}/{len(planned)}: {_progress(row)}", flush=True)
        report = _write(opts, values, peak, rows, fits, done=(i, len(planned)))
    return report


def _progress(r: dict) -> str:
    """One line per finished row for the console."""
    what = f"{_label(r)} {r['shape']} ckpt={r['checkpointing']}"
    if r.get("error"):
        return f"{what}: {r['error']}"
    if "fits" in r:
        return f"{what}: largest batch {r['fits']}, peak {_fmt(r.get('peak_gib'), '.1f')} GiB"
    step = f"{r['step_s'] * 1e3:.1f} ms, MFU {100 * r['mfu']:.3g}%"
    return f"{what}: {step}, peak {_fmt(r.get('peak_gib'), '.1f')} GiB"


def _write(opts: TrainBench, values: dict[str, Any], peak: dict[str, Any], rows: list[dict],
           fits: list[dict], done: tuple[int, int]) -> dict[str, Any]:  # fmt: skip
    """The report of the rows so far; the chart is drawn once, with the last row."""
    dev = torch.device(opts.device)
    cuda = dev.type == "cuda"
    precision = "bf16 autocast" if cuda else "float32"
    adamw = "fused AdamW" if cuda else "AdamW"
    tables = [_table(rows)]
    if fits:
        tables.append(_fit_table(fits, opts.batch_size, opts.max_batch))
    text = [
        f"Matmul peak measured here: {peak['tflops']:.3g} TFLOP/s ({peak['dtype']}, "
        f"{peak['n']}^3); MFU = model FLOPs per token x tokens/s / that peak. FLOPs per token: "
        "6 x active matmul weights (experts k of E, router, LM head; no embedding) + "
        "12 x layers x heads x head_dim x seq_len (PaLM; attention without the causal half).",
        f"{precision} over float32 master weights, {adamw}, grad clip 1.0; mean step time "
        f"over {opts.steps} steps after {opts.warmup} warm-up steps; peak memory while timed. "
        "Largest batch: two steps fit; its step time is the second step's.",
    ]
    if opts.loss_chunk_tokens:
        text.append(
            f"moekit models compute the LM loss {opts.loss_chunk_tokens} tokens at a time, each "
            "chunk's logits recomputed in the backward (model.loss_chunk_tokens)."
        )
    if done[0] < done[1]:
        text.append(f"Partial: {done[0]} of {done[1]} runs finished when this was written.")
    shown = {k: v for k, v in values.items() if k != "out_dir"}
    lines = ratios(rows)
    return write_report(
        f"train-{dev.type}",
        f"MoE training step at size, {dev.type}",
        bench_command("train", **shown),
        tables,
        {"rows": rows, "largest_batch": fits, "peak": peak, "ratios": lines},
        config=opts,
        device=opts.device,
        text=text,
        notes=[*lines, TARGETS] if lines else [],
        out_dir=opts.out_dir,
        chart=_chart(rows, f"MoE training step at size, {dev.type}")
        if done[0] == done[1]
        else False,
    )


def _chart(rows: list[dict], title: str) -> Chart | bool:
    """Step time, MFU and peak memory of the rows that ran (a failed row draws nothing):
    a group of bars per shape, a bar per contender (and checkpointing, where it varies)."""
    ok = [r for r in rows if "mfu" in r]
    modes = {r["checkpointing"] for r in ok}
    points = [
        {"shape": r["shape"], "step_ms": r["step_s"] * 1e3, "mfu_percent": 100 * r["mfu"],
         "peak_gib": r["peak_gib"],
         "contender": _label(r) + (f", ckpt {r['checkpointing']}" if len(modes) > 1 else "")}
        for r in ok
    ]  # fmt: skip
    metrics = [("step_ms", "step time", "ms"), ("mfu_percent", "MFU", "% of measured peak"),
               ("peak_gib", "peak memory", "GiB")]  # fmt: skip
    return grouped_bars(title, points, "shape", "contender", metrics) or False
