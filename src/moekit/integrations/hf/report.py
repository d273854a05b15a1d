"""How a Hugging Face MoE model routes some text: per-layer expert load, entropy, dead experts.

`routing_report(model, inputs)` runs the model with a forward hook on each MoE block's router
(`gate` or `router` beside an `experts` module). transformers 5 routers return (logits [T, E],
weights [T, K], indices [T, K]); a router that returns logits alone is read as softmax top-k
with the config's num_experts_per_tok. Counts stay on the device until the one read at the end.
Entropy is that of the softmax over the router logits (sigmoid routers score differently, the
number still compares layers). Padding tokens route like any other: pass unpadded batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class LayerRouting:
    """One router's totals over every token it saw."""

    name: str  # module path of the router
    counts: list[int]  # [E] token-slots sent to each expert
    entropy: float  # mean router entropy per token, nats
    tokens: int

    @property
    def n_experts(self) -> int:
        return len(self.counts)

    @property
    def load(self) -> list[float]:
        """Each expert's share of the token-slots (sums to 1)."""
        total = max(1, sum(self.counts))
        return [c / total for c in self.counts]

    @property
    def dead(self) -> list[int]:
        return [e for e, c in enumerate(self.counts) if c == 0]

    @property
    def max_over_mean(self) -> float:
        return max(self.load) * self.n_experts if self.counts else 0.0


@dataclass
class RoutingReport:
    layers: list[LayerRouting] = field(default_factory=list)

    def table(self):
        """A rich Table: one row per MoE layer."""
        from rich.table import Table

        table = Table(title="routing per MoE layer")
        for col in ("layer", "tokens", "experts", "load max/mean", "entropy / ln E", "dead"):
            left = col in ("layer", "dead")
            table.add_column(col, justify="left" if left else "right", no_wrap=col == "layer")
        for layer in self.layers:
            dead = ", ".join(map(str, layer.dead[:12])) + (" ..." if len(layer.dead) > 12 else "")
            table.add_row(
                layer.name,
                str(layer.tokens),
                str(layer.n_experts),
                f"{layer.max_over_mean:.2f}",
                f"{layer.entropy / math.log(max(2, layer.n_experts)):.3f}",
                dead or "-",
            )
        return table

    def print(self, console=None) -> None:
        from rich.console import Console

        (console or Console()).print(self.table())

    def loads(self) -> tuple[list[str], list[list[float]]]:
        """(router names, each one's expert load shares): what `moekit.viz.routing.
        plot_expert_load` draws as a layers x experts heatmap."""
        return [layer.name for layer in self.layers], [layer.load for layer in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [
                {"name": x.name, "tokens": x.tokens, "counts": x.counts, "entropy": x.entropy}
                for x in self.layers
            ]
        }


def router_modules(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """(name, router module, number of experts) of every MoE block in model order."""
    found = []
    for name, block in model.named_modules():
        experts = getattr(block, "experts", None)
        if not isinstance(experts, nn.Module):
            continue
        for attr in ("gate", "router"):
            router = getattr(block, attr, None)
            if isinstance(router, nn.Module):
                n = getattr(experts, "num_experts", None) or getattr(router, "num_experts", None)
                found.append((f"{name}.{attr}" if name else attr, router, int(n)))
                break
    return found


class _Tally:
    """Device-side running totals of one router: counts [E], entropy sum, tokens."""

    def __init__(self, n_experts: int, k: int | None) -> None:
        self.n_experts, self.k = n_experts, k
        self.counts: Tensor | None = None
        self.entropy: Tensor | None = None
        self.tokens = 0

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, tuple):
            logits = output[0]
            index = next(
                t for t in reversed(output) if torch.is_tensor(t) and not t.is_floating_point()
            )
        else:
            if self.k is None:
                raise ValueError(
                    "router returns logits only and the config has no num_experts_per_tok"
                )
            logits, index = output, output.topk(self.k, dim=-1).indices
        logits_TE = logits.detach().reshape(-1, logits.shape[-1]).float()
        counts_E = torch.bincount(index.reshape(-1), minlength=self.n_experts)[: self.n_experts]
        p_TE = logits_TE.softmax(-1)
        entropy = -(p_TE * p_TE.clamp_min(1e-30).log()).sum()
        self.counts = counts_E if self.counts is None else self.counts + counts_E
        self.entropy = entropy if self.entropy is None else self.entropy + entropy
        self.tokens += logits_TE.shape[0]

    def _sync_result(self, name: str) -> LayerRouting:
        """NOTE: host sync, once per layer after every batch ran."""
        counts = self.counts.tolist() if self.counts is not None else [0] * self.n_experts
        entropy = float(self.entropy) / max(1, self.tokens) if self.entropy is not None else 0.0
        return LayerRouting(name, counts, entropy, self.tokens)


def _batches(inputs: Any) -> Iterable[Any]:
    if torch.is_tensor(inputs) or isinstance(inputs, dict) or hasattr(inputs, "keys"):
        return [inputs]
    return inputs


@torch.no_grad()
def routing_report(model: nn.Module, inputs: Any, console: Any = None) -> RoutingReport:
    """Route `inputs` (token ids [B, S], a dict of model inputs, or an iterable of either).

    Prints the table with rich (console=False prints nothing); `report.loads()` is the heatmap.
    """
    routers = router_modules(model)
    if not routers:
        raise ValueError(
            f"{type(model).__name__} has no MoE block (an `experts` module beside a gate)"
        )
    k = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
    tallies = [_Tally(n, k) for _, _, n in routers]
    hooks = [r.register_forward_hook(t) for (_, r, _), t in zip(routers, tallies, strict=True)]
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(inputs):
            if torch.is_tensor(batch):
                model(batch)
            else:
                model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    report = RoutingReport(
        [t._sync_result(name) for (name, _, _), t in zip(routers, tallies, strict=True)]
    )
    if console is not False:
        report.print(console)
    return report


def text_batches(ids: list[int], seq_len: int, batch_size: int, device: Any) -> list[Tensor]:
    """Token ids cut into [B, seq_len] batches (a shorter last sequence is its own batch)."""
    rows = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    full = [r for r in rows if len(r) == seq_len]
    out = [
        torch.tensor(full[i : i + batch_size], device=device)
        for i in range(0, len(full), batch_size)
    ]
    if rows and len(rows[-1]) < seq_len:
        out.append(torch.tensor([rows[-1]], device=device))
    return out


def report_text(
    hf_dir: str | Path,
    text: str,
    seq_len: int = 512,
    max_tokens: int = 16384,
    device: str = "auto",
    console: Any = None,
) -> RoutingReport:
    """`routing_report` of an HF checkpoint directory on some text, tokenized by its tokenizer."""
    from moekit.integrations.hf.convert import _transformers
    from moekit.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(hf_dir)
    if tokenizer is None:
        raise FileNotFoundError(f"{hf_dir}: no tokenizer.json to tokenize the text with")
    ids = tokenizer.encode(text)[:max_tokens]
    if not ids:
        raise ValueError("the text holds no tokens")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    auto = _transformers().AutoModelForCausalLM
    model = auto.from_pretrained(str(hf_dir), dtype="auto").to(device)
    return routing_report(model, text_batches(ids, seq_len, 8, device), console)
