"""The bottom floor: the values every stage of the layer passes on, and nothing that computes them.

Routers produce a `Routing`, the plan stage a `Plan`, backends read `ExpertWeights`; each side
imports this module only, so none of them imports another. Nothing here imports from moekit.

Shape legend: T tokens, K slots per token, S = T * K token-slots, E experts, D model dim,
H expert hidden, H1 = 2H for gated activations (gate half first, up half second), else H.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("gelu", "relu", "silu", "swiglu", "geglu", "reglu")
GATED_ACTIVATIONS = ("swiglu", "geglu", "reglu")
_BASE = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swiglu": F.silu,
    "geglu": F.gelu,
    "reglu": F.relu,
}


def activate(h: Tensor, activation: str) -> Tensor:
    """[..., H1] -> [..., H]: plain activation, or act(gate) * up for gated ones."""
    if activation in GATED_ACTIVATIONS:
        gate, up = h.chunk(2, dim=-1)
        return _BASE[activation](gate) * up
    return _BASE[activation](h)


def capacity(n_tokens: int, k: int, n_experts: int, capacity_factor: float | None) -> int | None:
    """Per-expert capacity C = ceil(cf * T * k / E) (Switch Transformer eq. 3); None: dropless."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * n_tokens * k / n_experts)


@dataclass
class Routing:
    """Which experts each token uses, with what weight.

    ``experts`` holds -1 in slots that carry no expert (expert choice leaves slots empty,
    capacity drops empty them); ``weights`` is 0 there. ``priority`` orders capacity drops:
    within an expert, higher priority is kept first, whatever the token's position.
    """

    experts: Tensor  # [T, K] int64, -1 = empty slot
    weights: Tensor  # [T, K] router dtype (float32, float64 for float64 inputs)
    priority: Tensor  # [T, K] score deciding capacity drops
    logits: Tensor  # [T, E] clean logits (after temperature, before noise)
    probs: Tensor  # [T, E] scores normalised over experts, used by the balance losses


@dataclass
class Plan:
    """Token-slots sorted by expert, kept ones first, at the static size S (no host sync)."""

    order_S: Tensor  # [S] flat slot ids (t * K + j) sorted by expert; kept slots first
    token_S: Tensor  # [S] source token of each sorted slot
    expert_S: Tensor  # [S] expert of each sorted slot, E for dropped / empty slots
    weight_S: Tensor  # [S] gate weight of each sorted slot, 0 where dropped
    counts_E: Tensor  # [E] int64 kept slots per expert
    offsets_E1: Tensor  # [E + 1] int64 exclusive prefix sums; offsets_E1[E] = kept slots
    kept_TK: Tensor  # [T, K] bool, slot kept after capacity
    weights_TK: Tensor  # [T, K] weights actually used (0 where dropped)
    n_experts: int
    capacity: int | None

    @classmethod
    def from_sort(
        cls,
        order_S: Tensor,
        token_S: Tensor,
        expert_S: Tensor,
        counts_E: Tensor,
        offsets_E1: Tensor,
        kept_TK: Tensor,
        used_TK: Tensor,
        capacity: int | None,
    ) -> Plan:
        """A Plan from a sort of the slots: weight_S is read from used_TK [T, K] through
        order_S (torch ops, so gradients reach the router), E from counts_E."""
        return cls(
            order_S=order_S,
            token_S=token_S,
            expert_S=expert_S,
            weight_S=used_TK.reshape(-1)[order_S],
            counts_E=counts_E,
            offsets_E1=offsets_E1,
            kept_TK=kept_TK,
            weights_TK=used_TK,
            n_experts=counts_E.shape[0],
            capacity=capacity,
        )


@dataclass(frozen=True)
class ExpertWeights:
    """The routed experts' tensors as a backend reads them (any strides: transposed views work).

    w1 [E, D, H1], w2 [E, H, D], b1 [E, H1] or None, b2 [E, D] or None.
    """

    w1: Tensor
    w2: Tensor
    b1: Tensor | None = None
    b2: Tensor | None = None

    def cast_like(self, x: Tensor) -> ExpertWeights:
        """These weights in x's dtype when autocast lowered x (fp32 master weights, bf16 GEMMs).

        Autocast does not reach the backends' custom ops, so without this the Triton kernels
        would stage fp32 weight tiles. The cast is differentiable: gradients still reach the
        fp32 parameters, as with autocast's nn.Linear.
        """
        device_type = x.device.type
        if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
            return self

        def cast(w: Tensor | None) -> Tensor | None:
            return w.to(x.dtype) if w is not None and w.dtype != x.dtype else w

        return ExpertWeights(cast(self.w1), cast(self.w2), cast(self.b1), cast(self.b2))

    @property
    def tensors(self) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """(w1, w2, b1, b2), for kernels that take them positionally."""
        return self.w1, self.w2, self.b1, self.b2
