"""Fused Triton backend: gather -> grouped GEMM -> activation -> grouped GEMM -> weighted
combine, with Triton backward kernels. No host sync: the tile schedule is built on the
device (`align`), so the layer runs under CUDA graphs and torch.compile.

Files: align (tile schedule), up (the grouped GEMM, its up / down / dX launchers and the fused
up-projection op), down (down-projection op + deterministic combine), backward (dh, weight
gradients, dX: the two backward ops), autograd (the fused and per-slot autograd Functions),
decode (the small-batch column split), configs (tuned configs as data, per shape class),
checks (operand checks of the launchers), plan (the dropless Plan as a counting sort), router
(the top-k / sigmoid routers' math after the logits GEMM as one kernel).
Shape legend: T tokens, S sorted token-slots, E experts, D model dim, H1 = w1's last dim.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from moekit.backends.base import Backend, register_backend
from moekit.types import ExpertWeights, Plan, Routing

FUSED_ROUTER_MAX_K = 16  # k rounds of argmax are unrolled in the kernel
FUSED_ROUTER_MAX_E = 1024  # one program holds a token's [E] scores
_HAVE_TRITON = importlib.util.find_spec("triton") is not None  # read once: compile-friendly


def _training(*params: Tensor | None) -> bool:
    """Whether autograd will need the backward (then the forward keeps h1)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)


@register_backend("triton", priority=20)
class TritonBackend(Backend):
    """The fused kernels, the counting-sort plan and the fused router; "auto" on CUDA."""

    auto_devices = ("cuda",)

    def unsupported(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """None on CUDA (or the CPU under TRITON_INTERPRET=1) for float dtypes, else why not."""
        if not _HAVE_TRITON:
            return "triton is not installed (pip install 'moekit[triton]')"
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"dtype {dtype} is not one of float16, bfloat16, float32"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return f"device {device.type} needs CUDA (or TRITON_INTERPRET=1 on the CPU)"

    def forward(self, x_TD: Tensor, plan: Plan, w: ExpertWeights, activation: str) -> Tensor:
        """The backend contract of `moekit.backends`: y_TD in x's dtype."""
        from moekit.backends.triton.autograd import FusedExperts

        if x_TD.shape[0] == 0 or plan.token_S.shape[0] == 0:  # static shapes: no sync
            return x_TD.new_zeros(x_TD.shape) + 0.0 * x_TD
        train = _training(x_TD, plan.weight_S, *w.tensors)
        return FusedExperts.apply(
            x_TD,
            plan.weight_S,
            *w.tensors,
            plan.token_S,
            plan.order_S,
            plan.kept_TK,
            plan.offsets_E1,
            activation,
            train,
        )

    def per_slot(
        self, x_SD: Tensor, offsets_E1: Tensor, w: ExpertWeights, activation: str
    ) -> Tensor:
        """Unweighted outputs [S, D] of the sorted rows, zero past the kept ones (the contract)."""
        from moekit.backends.triton.autograd import PerSlotExperts

        if x_SD.shape[0] == 0:  # static shapes: no sync
            return x_SD.new_zeros(0, w.w2.shape[-1]) + 0.0 * x_SD.sum()
        train = _training(x_SD, *w.tensors)
        return PerSlotExperts.apply(x_SD, *w.tensors, offsets_E1, activation, train)

    def make_plan(
        self, experts_TK: Tensor, weights_TK: Tensor, n_experts: int, capacity: int | None
    ) -> Plan | None:
        """On CUDA the dropless plan is one counting sort (equal output, two launches)."""
        if capacity is not None or not experts_TK.is_cuda:
            return None
        from moekit.backends.triton.plan import make_plan_dropless

        return make_plan_dropless(experts_TK, weights_TK, n_experts)

    def select(
        self,
        logits_TE: Tensor,
        k: int,
        renormalize: bool,
        scaling: float,
        bias_E: Tensor | None = None,
    ) -> Routing | None:
        """One kernel in inference on CUDA: float32 logits that need no gradient, k and E within
        the kernel's bounds; else None."""
        if not logits_TE.is_cuda or logits_TE.dtype != torch.float32:
            return None
        if torch.is_grad_enabled() and logits_TE.requires_grad:
            return None
        if k > FUSED_ROUTER_MAX_K or logits_TE.shape[-1] > FUSED_ROUTER_MAX_E:
            return None
        from moekit.backends.triton.router import fused_select

        return fused_select(logits_TE, k, renormalize, scaling, bias_E)
