"""Expert parameters, activations, initialisation and the registry of expert kinds.

Layout: w1 [E, D, H1] with H1 = 2H for gated activations (gate half first, up half second),
w2 [E, H, D]. Backends read them through strides, so transposed views (the Hugging Face /
vLLM layout gate_up_proj [E, 2H, D]) work without copies.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import ExpertConfig
from moekit.types import activate


def _fan_scale(init: str, w: Tensor) -> float:
    """One expert matrix w [..., fan_in, fan_out] (x @ w): the std of a normal init, the bound
    of a uniform one. Glorot over fan_in + fan_out, He over fan_in with the ReLU gain sqrt(2)."""
    fan = w.shape[-2] + w.shape[-1] if init.startswith("xavier") else w.shape[-2]
    return math.sqrt((2.0 if init.endswith("normal") else 6.0) / fan)


def init_expert_weights(w1: Tensor, w2: Tensor, cfg: ExpertConfig) -> None:
    """normal(init_std); depth_scaled shrinks w2 by sqrt(2L); xavier / kaiming (uniform or
    normal) from the fans of one expert's matrix."""
    with torch.no_grad():
        if cfg.init.startswith(("xavier", "kaiming")):
            for w in (w1, w2):
                scale = _fan_scale(cfg.init, w)
                if cfg.init.endswith("normal"):
                    w.normal_(std=scale)
                else:
                    w.uniform_(-scale, scale)
            return
        w1.normal_(std=cfg.init_std)
        scale = 1.0 / math.sqrt(2.0 * cfg.n_layers) if cfg.init == "depth_scaled" else 1.0
        w2.normal_(std=cfg.init_std * scale)


_EXPERTS: dict[str, type[Experts]] = {}


def register_expert(name: str) -> Callable[[type[Experts]], type[Experts]]:
    """Class decorator adding an `Experts` subclass as `ExpertConfig.kind` `name`.

    A subclass that overrides `expert(e, x_ND)` is computed expert by expert over the plan's
    sorted slots (and checked by the reference, which calls `expert` too); one that keeps it
    runs on the fused backends. Its constructor takes (n_experts, d_model, d_hidden, cfg).
    """

    def wrap(cls: type[Experts]) -> type[Experts]:
        if not (isinstance(cls, type) and issubclass(cls, Experts)):
            raise ValueError(f"expert kind {name!r} must be a subclass of moekit.experts.Experts")
        if _EXPERTS.get(name, cls) is not cls:
            raise ValueError(f"expert kind {name!r} is already registered")
        _EXPERTS[name] = cls
        return cls

    return wrap


def available_experts() -> tuple[str, ...]:
    return tuple(sorted(_EXPERTS))


def build_experts(n_experts: int, d_model: int, d_hidden: int, cfg: ExpertConfig) -> Experts:
    """The routed experts of kind `cfg.kind`; an unknown kind raises a ValueError naming it."""
    if cfg.kind not in _EXPERTS:
        known = ", ".join(map(repr, available_experts()))
        raise ValueError(f"expert.kind={cfg.kind!r} is not one of {known}")
    return _EXPERTS[cfg.kind](n_experts, d_model, d_hidden, cfg)


def _sync_bounds(offsets_E1: Tensor) -> list[tuple[int, int]]:
    """Each expert's [start, end) among the sorted slots. NOTE: host sync."""
    ends = offsets_E1.tolist()
    return list(zip(ends[:-1], ends[1:], strict=True))


class Experts(nn.Module):
    """E expert MLPs stored as stacked weights."""

    def __init__(self, n_experts: int, d_model: int, d_hidden: int, cfg: ExpertConfig) -> None:
        super().__init__()
        self.activation = cfg.activation
        self.dropout = cfg.dropout
        h1 = 2 * d_hidden if cfg.gated else d_hidden
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, h1))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_hidden, d_model))
        self.b1 = nn.Parameter(torch.zeros(n_experts, h1)) if cfg.bias else None
        self.b2 = nn.Parameter(torch.zeros(n_experts, d_model)) if cfg.bias else None
        init_expert_weights(self.w1, self.w2, cfg)

    def expert(self, e: int, x_ND: Tensor) -> Tensor:
        """One expert on a few rows; the reference and small paths use it."""
        h = x_ND @ self.w1[e]
        if self.b1 is not None:
            h = h + self.b1[e]
        h = activate(h, self.activation)
        if self.training and self.dropout > 0:
            h = F.dropout(h, self.dropout)
        y = h @ self.w2[e]
        return y + self.b2[e] if self.b2 is not None else y

    @property
    def fused(self) -> bool:
        """Whether the backends compute these experts (from w1, w2, b1, b2 and activation);
        not while training with expert dropout, which only `expert` applies."""
        dropping = self.training and self.dropout > 0
        return type(self).expert is Experts.expert and not dropping

    def per_slot(self, x_SD: Tensor, offsets_E1: Tensor) -> Tensor:
        """Unweighted outputs [S, D] of rows sorted by expert, one `expert` call per expert;
        zero past the kept rows (the `Backend.per_slot` contract of `moekit.backends`)."""
        out_SD = torch.zeros_like(x_SD)
        for e, (lo, hi) in enumerate(_sync_bounds(offsets_E1)):
            if hi > lo:
                out_SD[lo:hi] = self.expert(e, x_SD[lo:hi])
        return out_SD


class DenseMLP(Experts):
    """A single always-on MLP: shared experts and the dense fallback."""

    def __init__(self, d_model: int, d_hidden: int, cfg: ExpertConfig) -> None:
        super().__init__(1, d_model, d_hidden, cfg)

    def forward(self, x_TD: Tensor) -> Tensor:
        return self.expert(0, x_TD)


class GatedDenseMLP(DenseMLP):
    """A shared expert whose output each token scales by sigmoid(x . gate) (Qwen2-MoE)."""

    def __init__(self, d_model: int, d_hidden: int, cfg: ExpertConfig) -> None:
        super().__init__(d_model, d_hidden, cfg)
        self.gate = nn.Parameter(torch.empty(1, d_model))  # [1, D]
        nn.init.normal_(self.gate, std=cfg.init_std)

    def forward(self, x_TD: Tensor) -> Tensor:
        return torch.sigmoid(F.linear(x_TD, self.gate)) * super().forward(x_TD)


register_expert("mlp")(Experts)
