"""Load health while training: dead experts and collapsing layers, counted on the device.

Every step, per MoE layer, an expert whose share of the token-slots is under
`health.dead_load` of the uniform share 1/E is *starved*; one starved for `health.patience`
consecutive steps is *dead*. A layer whose expert-load entropy, over log(E), stays under
`health.collapse_entropy` that long has *collapsed* onto a few experts. (The per-token router
entropy is logged too, but it falls in healthy training as routers grow decisive; it is the
load spread over experts that collapses.) Counters live on the device and are read only in the
log flush's one host transfer; `finish` turns them into expert ids for the log and the view.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from moekit.train.config import HealthConfig


def load_entropy(load_E: Tensor) -> Tensor:
    """Entropy of an expert-load distribution [E] over log(E): 1 uniform, 0 one expert."""
    E = load_E.shape[0]
    if E < 2:
        return load_E.new_ones(())
    p_E = load_E.float()
    return -(p_E * p_E.clamp_min(1e-12).log()).sum() / math.log(E)


class LoadHealth:
    """Per-layer starvation and low-entropy streaks, updated from each step's expert loads."""

    def __init__(self, cfg: HealthConfig) -> None:
        self.cfg = cfg
        self.starved: dict[str, Tensor] = {}  # layer -> [E] consecutive starved steps
        self.low: dict[str, Tensor] = {}  # layer -> [] consecutive low-entropy steps

    def update(self, expert_load: dict[str, Tensor]) -> dict[str, Tensor]:
        """Count this step's loads (layer -> [E] shares); returns each layer's load entropy."""
        entropies = {}
        for layer, load_E in expert_load.items():
            load_E = load_E.detach()
            E = load_E.shape[0]
            starved_E = load_E < self.cfg.dead_load / E
            streak_E = self.starved.get(layer, torch.zeros_like(load_E, dtype=torch.int32))
            self.starved[layer] = torch.where(starved_E, streak_E + 1, 0)
            entropy = load_entropy(load_E)
            low = self.low.get(layer, torch.zeros((), dtype=torch.int32, device=load_E.device))
            self.low[layer] = torch.where(entropy < self.cfg.collapse_entropy, low + 1, 0)
            entropies[layer] = entropy
        return entropies

    def snapshot(self) -> dict[str, Any]:
        """The counters now, as device tensors for the next log flush to read."""
        return {
            "starved_steps": {k: v.clone() for k, v in self.starved.items()},
            "low_entropy_steps": {k: v.clone() for k, v in self.low.items()},
        }

    def finish(self, record: dict[str, Any]) -> dict[str, Any]:
        """A synced record's counters -> dead expert ids and collapsed layers (plain lists)."""
        counts = record.pop("health", None)
        if counts is None:
            return record
        patience = self.cfg.patience
        dead = {
            layer: [e for e, n in enumerate(steps) if n >= patience]
            for layer, steps in counts["starved_steps"].items()
        }
        low = counts["low_entropy_steps"].items()
        record["health"] = {
            "dead_experts": {layer: ids for layer, ids in dead.items() if ids},
            "collapsed_layers": [layer for layer, n in low if n >= patience],
        }
        return record


def health_line(health: dict[str, Any]) -> str:
    """One line naming dead experts and collapsed layers; empty when all is well."""
    parts = [
        f"layer {layer}: dead experts {', '.join(map(str, ids))}"
        for layer, ids in health.get("dead_experts", {}).items()
    ]
    collapsed = health.get("collapsed_layers", [])
    if collapsed:
        parts.append(f"collapsed layers {', '.join(collapsed)}")
    return "; ".join(parts)
