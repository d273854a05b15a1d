"""`moekit convert ...` and `moekit route-report`: Hugging Face checkpoints (moekit[hf]).

A refused checkpoint or a file in the way ends the command with one line naming the command.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moekit.commands import argument, command, group, option

group("convert", "Convert MoE checkpoints between Hugging Face and moekit.")
# what these commands name themselves in their one-line error (UnsupportedCheckpoint is one)
REFUSALS = (ValueError, FileNotFoundError, FileExistsError, ImportError)


@dataclass
class HfToMoekit:
    hf_dir: str = argument("HF checkpoint directory (safetensors)")
    out: str = argument("new moekit checkpoint directory")
    max_seq_len: int | None = option(
        None,
        "longest context (serving sizes its KV slots by it); default max_position_embeddings",
    )
    dtype: str | None = option(None, "bf16, fp16, fp32")


@dataclass
class MoekitToHf:
    ckpt: str = argument("moekit checkpoint directory")
    out: str = argument("new HF checkpoint directory")
    dtype: str | None = option(None, "bf16, fp16, fp32")


@dataclass
class RouteReport:
    hf_dir: str = argument("HF checkpoint directory with tokenizer.json")
    text: str = argument("UTF-8 text file to route", flag=True)
    seq_len: int = option(512, "tokens per sequence")
    max_tokens: int = option(16384, "tokens read at most")
    plot: str = option("route-report.png", "heatmap PNG")
    device: str = option("auto", "auto, cpu or cuda")


def convert(a: HfToMoekit | MoekitToHf) -> None:
    """Either direction; the HF side needs moekit[hf]."""
    from moekit.integrations.hf import hf_to_moekit, moekit_to_hf

    if isinstance(a, HfToMoekit):
        hf_to_moekit(a.hf_dir, a.out, a.max_seq_len, a.dtype)
    else:
        moekit_to_hf(a.ckpt, a.out, a.dtype)
    print(f"wrote {a.out}")


command(
    "convert hf-to-moekit",
    HfToMoekit,
    help="An HF MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) as a moekit checkpoint, its "
    "tokenizer files beside it.",
    refusals=REFUSALS,
)(convert)
command(
    "convert moekit-to-hf",
    MoekitToHf,
    help="A moekit checkpoint whose architecture maps onto Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE "
    "as an HF checkpoint AutoModelForCausalLM loads.",
    refusals=REFUSALS,
)(convert)


@command(
    "route-report",
    RouteReport,
    help="Per-layer expert load, router entropy and dead experts of an HF MoE model on a text "
    "file; prints a table and draws a layers x experts heatmap.",
    refusals=REFUSALS,
)
def route_report(a: RouteReport) -> None:
    from moekit.integrations.hf.report import report_text
    from moekit.viz.routing import plot_expert_load

    text = Path(a.text).read_text(encoding="utf-8")
    report = report_text(a.hf_dir, text, a.seq_len, a.max_tokens, a.device)
    plot_expert_load(*report.loads(), a.plot)
    print(f"wrote {a.plot}")
