"""`moekit bench hf`: HF MoE models per experts_implementation (eager, grouped_mm, moekit).

A random-init model of a few decoder layers with a real model's layer shapes runs the same
inputs under every implementation, switched on one model instance: forward tokens/s at T
tokens, forward + backward tokens/s, and decode tokens/s at each batch size (one new token
per row after a prefill, KV cache held by transformers). The decoder stack alone is timed
(`model.model`, no LM head), so the vocabulary projection does not hide the experts' share.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from moekit.bench.charts import grouped_bars
from moekit.bench.registry import bench_command, option, register_bench
from moekit.bench.report import DEFAULT_DIR, Table, write_report
from moekit.bench.timing import median_ms

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLEMENTATIONS = ("eager", "grouped_mm", "moekit")


@dataclass(frozen=True)
class HFShape:
    name: str
    model_type: str
    config: dict[str, Any] = field(default_factory=dict)  # the family's config keywords


SHAPES = {
    "qwen3-30b-a3b": HFShape(
        "Qwen3-30B-A3B layers (E128 k8 D2048 H768)",
        "qwen3_moe",
        dict(
            vocab_size=151936,
            hidden_size=2048,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            moe_intermediate_size=768,
            intermediate_size=6144,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        ),
    ),
    "mixtral-8x7b": HFShape(
        "Mixtral-8x7B layers (E8 k2 D4096 H14336)",
        "mixtral",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=14336,
            num_local_experts=8,
            num_experts_per_tok=2,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        ),
    ),
}


@dataclass
class HFBench:
    """HF MoE layers (Qwen3-30B-A3B, Mixtral shapes) per experts_implementation, incl. moekit."""

    device: str = option("cuda", "cpu or cuda[:N] (CUDA: every timed call ends in a sync)")
    dtype: str = option("bf16", f"weights and activations, one of {list(DTYPES)}")
    shapes: list[str] = option(list(SHAPES), f"layer shapes, from {list(SHAPES)}")
    layers: int = option(2, "decoder layers of the random-init model")
    tokens: int = option(4096, "tokens of the forward and forward+backward columns")
    decode_batches: list[int] = option([1, 32], "rows of the decode columns")
    context: int = option(256, "prompt tokens prefilled before decode steps are timed")
    decode_steps: int = option(16, "decode steps timed per repetition")
    implementations: list[str] = option(list(IMPLEMENTATIONS), "experts_implementation values")
    repeats: int = option(10, "timed repetitions; the median is reported")
    out_dir: str = option(DEFAULT_DIR, "directory of the .md and .json ('' writes none)")

    def __post_init__(self) -> None:
        if not self.device.startswith(("cpu", "cuda")):
            raise ValueError(f"device={self.device!r} must be cpu or cuda[:N]")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {list(DTYPES)}")
        unknown = sorted(set(self.shapes) - set(SHAPES))
        if unknown or not self.shapes:
            raise ValueError(f"shapes={self.shapes} must be a non-empty subset of {list(SHAPES)}")
        for name in ("layers", "tokens", "context", "decode_steps", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.decode_batches or min(self.decode_batches) < 1:
            raise ValueError(f"decode_batches={self.decode_batches} must be sizes >= 1")
        bad = sorted(set(self.implementations) - set(IMPLEMENTATIONS))
        if bad or not self.implementations:
            raise ValueError(
                f"implementations={self.implementations} must be from {IMPLEMENTATIONS}"
            )


def build_model(shape: HFShape, layers: int, dtype: torch.dtype, device: torch.device):
    """A random-init HF causal LM with the shape's layer sizes; routers drawn, never zero."""
    import transformers

    cfg = transformers.AutoConfig.for_model(
        shape.model_type, num_hidden_layers=layers, **shape.config
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():  # a zero-initialised router would send every token to the same k
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(std=cfg.initializer_range)
    return model.eval()


def _decode_ms(base, vocab: int, batch: int, context: int, steps: int, repeats: int, device):
    """Median ms of `steps` one-token decode steps of `batch` rows after a `context` prefill."""
    from transformers import DynamicCache

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
    step_ids = torch.randint(0, vocab, (steps, batch, 1), generator=gen).to(device)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):  # the first round warms up
            cache = DynamicCache(config=base.config)
            base(prompt, None, None, cache, use_cache=True)
            sync()
            start = time.perf_counter()
            for s in range(steps):
                base(step_ids[s], None, None, cache, use_cache=True)
            sync()
            if i:
                times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


def _fwd_bwd(base, ids: torch.Tensor) -> Callable[[], None]:
    params = [p for p in base.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        base(ids).last_hidden_state.float().square().mean().backward()

    return step


@dataclass(frozen=True)
class Timing:
    """What `bench_shape` measures (the HFBench options other than shapes and files)."""

    dtype: str
    layers: int
    tokens: int
    decode_batches: tuple[int, ...]
    context: int
    decode_steps: int
    implementations: tuple[str, ...]
    repeats: int


def bench_shape(shape: HFShape, cfg: Timing, device: torch.device) -> list[dict[str, Any]]:
    """One row per implementation: forward, forward+backward and decode tokens/s."""
    from moekit.integrations.hf import register

    register()
    model = build_model(shape, cfg.layers, DTYPES[cfg.dtype], device)
    base, vocab = model.model, model.config.vocab_size
    ids = torch.randint(0, vocab, (1, cfg.tokens), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    rows = []
    for impl in cfg.implementations:
        model.set_experts_implementation(impl)
        with torch.no_grad():
            fwd = median_ms(lambda: base(ids), cfg.repeats, device=device)
        fwd_bwd = median_ms(_fwd_bwd(base, ids), cfg.repeats, device=device)
        row = {
            "shape": shape.name,
            "implementation": impl,
            "fwd_tok_s": cfg.tokens / fwd * 1e3,
            "fwd_bwd_tok_s": cfg.tokens / fwd_bwd * 1e3,
        }
        for batch in cfg.decode_batches:
            ms = _decode_ms(base, vocab, batch, cfg.context, cfg.decode_steps, cfg.repeats, device)
            row[f"decode_b{batch}_tok_s"] = batch * cfg.decode_steps / ms * 1e3
        rows.append(row)
    model.zero_grad(set_to_none=True)
    return rows


def _table(rows: list[dict[str, Any]], batches: Sequence[int], tokens: int) -> Table:
    decode = [f"decode b={b} tok/s" for b in batches]
    table = Table(
        ("shape", "experts_implementation", f"fwd tok/s (T={tokens})", "fwd+bwd tok/s", *decode)
    )
    for r in rows:
        cells = [f"{r['fwd_tok_s']:.0f}", f"{r['fwd_bwd_tok_s']:.0f}"]
        cells += [f"{r[f'decode_b{b}_tok_s']:.0f}" for b in batches]
        table.rows.append((r["shape"], r["implementation"], *cells))
    return table


def _chart(rows: list[dict[str, Any]], batches: Sequence[int], tokens: int, title: str) -> Any:
    """tokens/s per phase: a group of bars per shape, a bar per experts_implementation."""
    metrics = [("fwd_tok_s", f"forward, T={tokens}", "tokens/s"),
               ("fwd_bwd_tok_s", f"forward + backward, T={tokens}", "tokens/s")]  # fmt: skip
    metrics += [(f"decode_b{b}_tok_s", f"decode, batch {b}", "tokens/s") for b in batches]
    return grouped_bars(title, rows, "shape", "implementation", metrics) or False


@register_bench("hf", HFBench)
def run(
    device: str = "cuda",
    dtype: str = "bf16",
    shapes: Sequence[str | HFShape] = tuple(SHAPES),
    layers: int = 2,
    tokens: int = 4096,
    decode_batches: Sequence[int] = (1, 32),
    context: int = 256,
    decode_steps: int = 16,
    implementations: Sequence[str] = IMPLEMENTATIONS,
    repeats: int = 10,
    out_dir: str | None = DEFAULT_DIR,
) -> dict[str, Any]:
    """Times every shape and implementation; writes the report (rows under "rows")."""
    picked = [s if isinstance(s, HFShape) else SHAPES[s] for s in shapes]
    cfg = Timing(
        dtype, layers, tokens, tuple(decode_batches), context, decode_steps,
        tuple(implementations), repeats,
    )  # fmt: skip
    dev = torch.device(device)
    rows = [row for shape in picked for row in bench_shape(shape, cfg, dev)]
    options = {"device": device, **asdict(cfg), "shapes": [s.name for s in picked]}
    command = bench_command(
        "hf",
        device=device,
        dtype=dtype,
        shapes=list(shapes),
        layers=layers,
        tokens=tokens,
        decode_batches=list(decode_batches),
        context=context,
        decode_steps=decode_steps,
        implementations=list(implementations),
        repeats=repeats,
    )
    title = f"Hugging Face MoE layers per experts_implementation, {dev.type}"
    return write_report(
        f"hf-{dev.type}",
        title,
        command,
        [_table(rows, list(decode_batches), tokens)],
        {"rows": rows, "shapes": [asdict(s) for s in picked]},
        config=options,
        device=device,
        text=[
            f"{dtype}; {layers} random-init decoder layers of each shape, timed without the LM "
            f"head; median of {repeats} runs after warm-up. Decode: {decode_steps} one-token "
            f"steps after a {context}-token prefill, rows x steps / time."
        ],
        out_dir=out_dir,
        chart=_chart(rows, list(decode_batches), tokens, title),
    )
