"""Stage 3 of the layer: compute the routed experts given a `Plan`.

Every backend implements stage 3 whole, and its grouped middle, with the same contracts::

    experts_forward(x_TD, plan, w1, w2, b1, b2, activation) -> y_TD
    experts_per_slot(x_SD, offsets_E1, w1, w2, b1, b2, activation) -> out_ND

x_TD [T, D]; w1 [E, D, H1]; w2 [E, H, D] (any strides); b1 [E, H1] | None; b2 [E, D] | None.
experts_forward: y_TD[t] = sum over t's kept slots of weight * expert(x_t), in x's dtype.
experts_per_slot: rows already sorted by expert (`dispatch.gather`), expert e on rows
offsets_E1[e]:offsets_E1[e + 1], unweighted; N rows with offsets_E1[E] <= N <= S, zero past
the kept ones. `dispatch.combine` turns them into y_TD, so callers that need every slot's own
output (expert parallelism, the librarian) share one combine. Backends never change what is
computed: each matches `moekit.reference` in the tests.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from types import ModuleType

import torch

# name -> module; a module exposes experts_forward, experts_per_slot and
# supported(device, dtype) -> str | None
_MODULES = {
    "torch": "moekit.backends.torch",
    "grouped_mm": "moekit.backends.grouped_mm",
    "triton": "moekit.backends.triton",
}
# preference order for backend="auto", fastest first
_AUTO_ORDER = {"cuda": ("triton", "grouped_mm", "torch"), "cpu": ("torch",)}


def available_backends() -> tuple[str, ...]:
    """Backend names accepted by MoEConfig.backend (whether they run here or not)."""
    return tuple(_MODULES)


def check_backend(name: str) -> None:
    """Refuse a MoEConfig.backend naming no backend (checked when a layer is built)."""
    if name != "auto" and name not in _MODULES:
        known = ", ".join(map(repr, ("auto", *available_backends())))
        raise ValueError(f"backend={name!r} is not one of {known}")


def _module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError:
        return None


def unsupported_reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when backend `name` runs on (device, dtype), else why not."""
    module = _module(name)
    if module is None:
        return f"backend {name!r} could not be imported (is its optional dependency installed?)"
    return module.supported(device, dtype)


def get_backend(
    name: str, device: torch.device, dtype: torch.dtype, per_slot: bool = False
) -> Callable:
    """experts_forward of backend `name`, or experts_per_slot when per_slot.

    "auto" picks the fastest backend that runs on (device, dtype). Resolved once per
    arguments (and TRITON_INTERPRET, which decides whether triton runs on the CPU): the layer
    asks on every forward, and imports and checks cost more host time than a decode step's
    kernels.
    """
    return _resolve(name, device, dtype, per_slot, os.environ.get("TRITON_INTERPRET"))


@functools.cache
def _resolve(
    name: str, device: torch.device, dtype: torch.dtype, per_slot: bool, _interpret: str | None
) -> Callable:
    if name == "auto":
        candidates = _AUTO_ORDER.get(device.type, ("torch",))
        name = next(
            (c for c in candidates if unsupported_reason(c, device, dtype) is None), "torch"
        )
    reason = unsupported_reason(name, device, dtype)
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot run here: {reason}")
    module = _module(name)
    return module.experts_per_slot if per_slot else module.experts_forward
