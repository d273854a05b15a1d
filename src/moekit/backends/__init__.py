"""Stage 3 of the layer: compute the routed experts given a `Plan`.

Every backend implements one function with the same contract::

    experts_forward(x_TD, plan, w1, w2, b1, b2, activation) -> y_TD

x_TD [T, D]; w1 [E, D, H1]; w2 [E, H, D] (any strides); b1 [E, H1] | None; b2 [E, D] | None.
y_TD[t] = sum over t's kept slots of weight * expert(x_t), in x's dtype. Backends never
change what is computed: each matches `moekit.reference` in the tests.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import torch

# name -> module; a module exposes experts_forward(...) and supported(device, dtype) -> str | None
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


def get_backend(name: str, device: torch.device, dtype: torch.dtype) -> Callable:
    """The experts_forward function for `name` ("auto" picks the fastest that runs here)."""
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            if unsupported_reason(candidate, device, dtype) is None:
                return _module(candidate).experts_forward
        name = "torch"
    reason = unsupported_reason(name, device, dtype)
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot run here: {reason}")
    return _module(name).experts_forward
