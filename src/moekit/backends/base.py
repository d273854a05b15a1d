"""The `Backend` seam, its registry and `get_backend` (contracts in `moekit.backends`)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from moekit.dispatch import combine, gather
from moekit.types import ExpertWeights, Plan, Routing


class Backend:
    """The stage-3 seam. Subclasses implement `per_slot` (and `forward` when they fuse it)."""

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0  # backend="auto" takes the highest-priority supported one
    # device types "auto" may pick this backend on (None: any it supports)
    auto_devices: ClassVar[tuple[str, ...] | None] = None

    def unsupported(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """None when this backend runs on (device, dtype), else why not."""
        return None

    def supported(self, device: torch.device, dtype: torch.dtype) -> bool:
        return self.unsupported(device, dtype) is None

    def per_slot(
        self, x_SD: Tensor, offsets_E1: Tensor, w: ExpertWeights, activation: str
    ) -> Tensor:
        """Unweighted outputs [N, D] of the N kept sorted rows (contract in the module doc)."""
        raise NotImplementedError

    def forward(self, x_TD: Tensor, plan: Plan, w: ExpertWeights, activation: str) -> Tensor:
        """y_TD in x's dtype: gather, `per_slot`, combine (backends that fuse them override)."""
        out_ND = self.per_slot(gather(x_TD, plan.token_S), plan.offsets_E1, w, activation)
        return combine(out_ND, plan.token_S, plan.weight_S, x_TD.shape[0])

    def make_plan(
        self, experts_TK: Tensor, weights_TK: Tensor, n_experts: int, capacity: int | None
    ) -> Plan | None:
        """A plan equal to `dispatch.make_plan`'s, or None where this backend has no faster one."""
        return None

    # optional: the top-k / sigmoid router's choice from one kernel, called as
    # select(logits_TE, k, renormalize, scaling, bias_E=None) -> Routing, or None where it does
    # not apply (bias_E None: softmax top-k, else sigmoid scores chosen by score + bias_E)
    select: Callable[..., Routing | None] | None = None


@dataclass(frozen=True)
class Bound:
    """A backend with the weights and activation of one layer's experts: what a dispatcher runs."""

    backend: Backend
    weights: ExpertWeights | None  # None for a backend that reads its own module's weights
    activation: str

    def forward(self, x_TD: Tensor, plan: Plan) -> Tensor:
        return self.backend.forward(x_TD, plan, self.weights, self.activation)

    def per_slot(self, x_SD: Tensor, offsets_E1: Tensor) -> Tensor:
        return self.backend.per_slot(x_SD, offsets_E1, self.weights, self.activation)


_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, priority: int) -> Callable[[type[Backend]], type[Backend]]:
    """Class decorator adding a `Backend` subclass as MoEConfig.backend `name`."""

    def wrap(cls: type[Backend]) -> type[Backend]:
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise ValueError(f"backend {name!r} must be a subclass of moekit.backends.Backend")
        if name == "auto" or (name in _BACKENDS and type(_BACKENDS[name]) is not cls):
            raise ValueError(f"backend name {name!r} is already taken")
        cls.name, cls.priority = name, priority
        _BACKENDS[name] = cls()
        _resolve.cache_clear()
        return cls

    return wrap


def available_backends() -> tuple[str, ...]:
    """Backend names accepted by MoEConfig.backend (whether they run here or not)."""
    return tuple(_BACKENDS)


def check_backend(name: str) -> None:
    """Refuse a MoEConfig.backend naming no registered backend (checked when a layer is built)."""
    if name != "auto" and name not in _BACKENDS:
        known = ", ".join(map(repr, ("auto", *available_backends())))
        raise ValueError(f"backend={name!r} is not one of {known}")


def unsupported_reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when backend `name` runs on (device, dtype), else why not."""
    if name not in _BACKENDS:
        return f"backend {name!r} is not one of {', '.join(_BACKENDS)}"
    return _BACKENDS[name].unsupported(device, dtype)


def get_backend(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend `name` for (device, dtype); "auto" picks the highest-priority one that runs.

    Resolved once per arguments (and TRITON_INTERPRET, which decides whether triton runs on
    the CPU): probing costs more host time than a decode step's kernels.
    """
    return _resolve(name, device, dtype, os.environ.get("TRITON_INTERPRET"))


@functools.cache
def _resolve(
    name: str, device: torch.device, dtype: torch.dtype, _interpret: str | None
) -> Backend:
    if name == "auto":
        ranked = sorted(_BACKENDS.values(), key=lambda b: -b.priority)
        usable = [
            b
            for b in ranked
            if (b.auto_devices is None or device.type in b.auto_devices)
            and b.supported(device, dtype)
        ]
        if not usable:
            raise ValueError(f"backend='auto': no backend runs on {device.type} with {dtype}")
        return usable[0]
    reason = unsupported_reason(name, device, dtype)
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot run here: {reason}")
    return _BACKENDS[name]
