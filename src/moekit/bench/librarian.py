"""`moekit bench librarian`: how often deduplication fires and how much it changes y.

For layers whose experts come in pairs that differ by a relative perturbation ``noise``
(0 = exact copies; "independent" = ordinary random init), reports per threshold the fraction
of kept slots merged and the relative output error ||y_dedup - y|| / ||y|| against the same
layer without deduplication. No timings: the option computes every slot's output once, as
the plain layer does, and saves no expert FLOPs.
Writes ``<out_dir>/librarian-<machine>-<date>.md`` and ``.json``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.bench.registry import bench_command, option, register_bench
from moekit.bench.report import DEFAULT_DIR, Table, write_report
from moekit.config import MoEConfig
from moekit.layer import MoE

THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.99)
SHAPE = {"d_model": 64, "d_hidden": 128, "n_experts": 16, "k": 4}
NOISES: tuple[float | None, ...] = (None, 0.0, 0.05, 0.2, 0.5)  # None: independent experts


@dataclass
class LibrarianBench:
    """Librarian deduplication: firing rate and output error per similarity threshold."""

    tokens: int = option(2048, "tokens T through each layer")
    out_dir: str = option(DEFAULT_DIR, "directory of the .md and .json ('' writes none)")

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"tokens={self.tokens} must be >= 1")


def _layer(cfg: MoEConfig, noise: float | None, seed: int) -> MoE:
    """A layer whose odd experts are perturbed copies of the even ones (unless noise is None)."""
    torch.manual_seed(seed)
    moe = MoE(cfg).eval()
    if noise is not None:
        with torch.no_grad():
            for p in moe.experts.parameters():
                p[1::2] = p[0::2] * (1.0 + noise * torch.randn_like(p[0::2]))
    return moe


@torch.no_grad()
def bench_librarian(tokens: int = 2048, seed: int = 0) -> list[dict[str, Any]]:
    """One row per (noise, threshold): merged fraction of slots and relative output error."""
    base = MoEConfig(**SHAPE, backend="torch")
    x = torch.randn(tokens, base.d_model, generator=torch.Generator().manual_seed(seed + 1))
    rows = []
    for noise in NOISES:
        plain = _layer(base, noise, seed)
        y_plain, _ = plain(x)
        for threshold in THRESHOLDS:
            cfg = MoEConfig.from_dict({**base.to_dict(), "dedup_threshold": threshold})
            moe = MoE(cfg).eval()
            moe.load_state_dict(plain.state_dict())
            y, info = moe(x)
            error = (y - y_plain).norm() / y_plain.norm()
            rows.append(
                {
                    "experts": "independent" if noise is None else f"pairs, noise {noise:g}",
                    "threshold": threshold,
                    "dedup_fraction": float(info.metrics["dedup_fraction"]),
                    "rel_error": float(error),
                }
            )
    return rows


@register_bench("librarian", LibrarianBench)
def run(
    tokens: int = 2048, out_dir: str | Path | None = DEFAULT_DIR, seed: int = 0
) -> dict[str, Any]:
    """The deduplication table for pairs of near-copy experts; writes and returns the report."""
    rows = bench_librarian(tokens=tokens, seed=seed)
    table = Table(("experts", "threshold", "merged slots", "rel. error vs no dedup"))
    for r in rows:
        table.rows.append(
            (r["experts"], f"{r['threshold']:g}", f"{r['dedup_fraction']:.2%}")
            + (f"{r['rel_error']:.2e}",)
        )
    shape = ", ".join(f"{k}={v}" for k, v in SHAPE.items())
    return write_report(
        "librarian",
        "Librarian deduplication benchmark",
        bench_command("librarian", tokens=tokens),
        [table],
        {"rows": rows, "layer": SHAPE},
        config={"tokens": tokens, "seed": seed},
        text=[
            f"Layer: T={tokens} tokens, {shape}, swiglu, float32, torch backend, eval mode. "
            '"pairs, noise s": expert 2i+1 is expert 2i with every weight scaled by '
            '(1 + s * N(0, 1)); "independent": default random init.'
        ],
        notes=[
            "Merged slots: absorbed kept slots over kept slots (`info.metrics['dedup_fraction']`)."
            " Errors near 5e-8 are float32 rounding (the per-slot combine sums in another order)."
        ],
        out_dir=out_dir,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`moekit bench librarian` with these arguments."""
    from moekit.cli import main as cli_main

    return cli_main(["bench", "librarian", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
