"""`moekit.reference` as the tests' oracle: small layers with decisive routing, and what one
forward and backward pass of a layer (or of the reference on its weights) gives.

Import as ``from tests.oracle import ...`` (pytest's importlib mode resolves it from the root).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

import moekit
from moekit.backends import Backend
from moekit.types import ExpertWeights

# sizes of the layers under test unless a test overrides them
LAYER = {"d_model": 8, "d_hidden": 6, "n_experts": 4, "k": 2, "backend": "torch"}


def make_moe(
    router: str | moekit.RouterConfig = "topk",
    *,
    dtype: torch.dtype = torch.float64,
    router_std: float = 1.0,
    expert_std: float = 0.5,
    **fields,
) -> moekit.MoE:
    """An eval-mode layer of `LAYER` sizes (`fields` override any MoEConfig field).

    Router weights and expert parameters are redrawn with wide spreads, so routing is
    decisive (no near-ties for float error to flip) and biases are nonzero.
    """
    if isinstance(router, str):
        router = moekit.RouterConfig(kind=router)
    moe = moekit.MoE(moekit.MoEConfig(**{**LAYER, "router": router, **fields})).to(dtype).eval()
    with torch.no_grad():
        moe.router.weight.normal_(std=router_std)
        for p in moe.experts.parameters():
            p.normal_(std=expert_std)
    return moe


class Run(NamedTuple):
    """One forward + backward: y, its MoEInfo, dL/dx and every parameter's gradient."""

    y: Tensor
    info: moekit.MoEInfo
    grad_x: Tensor
    grads: dict[str, Tensor]


def forward_backward(
    fn: Callable[[Tensor], tuple[Tensor, moekit.MoEInfo]], moe: moekit.MoE, x: Tensor
) -> Run:
    """Run fn (the layer, or the reference on moe's weights) on x and differentiate
    L = sum(y * ramp) + aux_loss, a ramp so every output element gets its own weight."""
    moe.zero_grad()
    x = x.detach().clone().requires_grad_()
    y, info = fn(x)
    ramp = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    ((y * ramp).sum() + info.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}
    return Run(y.detach(), info, x.grad.clone(), grads)


def against_reference(moe: moekit.MoE, x: Tensor) -> tuple[Run, Run]:
    """The layer's run and the reference's run on the same weights and input."""
    layer = forward_backward(moe, moe, x)
    reference = forward_backward(lambda t: moekit.reference.moe_forward(moe, t), moe, x)
    return layer, reference


def rel(a: Tensor, b: Tensor) -> float:
    """Relative error |a - b| / |b| (a host sync: tests only)."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def by_weights(backend: Backend) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """(forward, per_slot) of `backend` taking w1, w2, b1, b2 one by one, as kernel tests
    build them: forward(x_TD, plan, w1, w2, b1, b2, act), per_slot(x_SD, offsets_E1, ...)."""

    def forward(x_TD, plan, w1, w2, b1, b2, act):
        return backend.forward(x_TD, plan, ExpertWeights(w1, w2, b1, b2), act)

    def per_slot(x_SD, offsets_E1, w1, w2, b1, b2, act):
        return backend.per_slot(x_SD, offsets_E1, ExpertWeights(w1, w2, b1, b2), act)

    return forward, per_slot
