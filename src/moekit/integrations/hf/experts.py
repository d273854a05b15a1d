"""`experts_implementation="moekit"`: transformers' MoE experts computed by moekit's backends.

transformers 5 calls every experts module decorated with `use_experts_implementation` as
`fn(module, hidden_states [T, D], top_k_index [T, K], top_k_weights [T, K] or [T, E]) -> [T, D]`
with weights gate_up_proj [E, 2H, D] and down_proj [E, D, H] ([E, D, 2H] / [E, H, D] when
`is_transposed`). Here the routing becomes a moekit `Plan` and the weights are read through
transposed views (no copies) by stage 3 of the layer; gradients reach HF's parameters and the
router's weights through the backend's autograd. A module flag moekit cannot honour exactly
raises a ValueError naming it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.backends import available_backends, get_backend
from moekit.dispatch import make_plan

NAME = "moekit"
_PLAIN = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}
_GATED = {"silu": "swiglu", "gelu": "geglu", "relu": "reglu"}
_PROBE = torch.linspace(-6.0, 6.0, 97, dtype=torch.float64)  # on the CPU: never a device sync
_ACTIVATIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sync_activation(act: Callable) -> str | None:
    """'silu', 'gelu' or 'relu' when act computes exactly that function, else None.

    NOTE: host sync on CPU tensors only (a probe, not the activations); cached per act_fn.
    """
    try:
        return _ACTIVATIONS[act]
    except (KeyError, TypeError):  # TypeError: a builtin function cannot be weakly referenced
        pass
    try:
        out = act(_PROBE)
    except (RuntimeError, TypeError):  # e.g. an activation with parameters on a GPU
        return None
    name = next((n for n, f in _PLAIN.items() if torch.equal(out, f(_PROBE))), None)
    with contextlib.suppress(TypeError):
        _ACTIVATIONS[act] = name
    return name


def _refuse(module: nn.Module, flag: str, why: str) -> None:
    raise ValueError(f'experts_implementation="moekit": {type(module).__name__}.{flag} {why}')


def _activation(module: nn.Module) -> str:
    from transformers.integrations.moe import _default_apply_gate

    if module.has_gate and type(module)._apply_gate is not _default_apply_gate:
        _refuse(module, "_apply_gate", "is a custom gate; moekit computes act(gate) * up only")
    act = getattr(module, "act_fn", None)
    base = _sync_activation(act) if act is not None else None
    if base is None:
        _refuse(module, "act_fn", f"= {act!r} is not silu, exact gelu or relu")
    return _GATED[base] if module.has_gate else base


def _weights(module: nn.Module) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """w1 [E, D, H1], w2 [E, H, D] as views of HF's parameters, b1 [E, H1], b2 [E, D] or None."""
    if getattr(module, "_is_expert_parallel", False):
        _refuse(module, "_is_expert_parallel", "is True; expert parallelism is not supported")
    if getattr(module, "has_post_expert_norm", False):
        _refuse(module, "has_post_expert_norm", "is True; a norm after each expert is unsupported")
    if module.has_gate and not getattr(module, "is_concatenated", True):
        _refuse(module, "is_concatenated", "is False; interleaved gate/up would need a copy")
    up = module.gate_up_proj if module.has_gate else module.up_proj
    w1, w2 = (up, module.down_proj) if module.is_transposed else (up.mT, module.down_proj.mT)
    if not module.has_bias:
        return w1, w2, None, None
    b1 = module.gate_up_proj_bias if module.has_gate else module.up_proj_bias
    return w1, w2, b1, module.down_proj_bias


def experts_forward(
    module: nn.Module,
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    backend: str = "auto",
) -> Tensor:
    """The experts of an HF MoE block on moekit's stage 3: [T, D] -> [T, D] in the input dtype."""
    T, K = top_k_index.shape
    E = module.num_experts
    experts_TK = top_k_index.long()
    if top_k_weights.shape == (T, K):
        weights_TK = top_k_weights
    elif top_k_weights.shape == (T, E):  # dense router scores: each slot reads its expert's
        weights_TK = top_k_weights.gather(1, experts_TK)
    else:
        raise ValueError(
            f"top_k_weights must be [T, K] = [{T}, {K}] or [T, E] = [{T}, {E}], "
            f"got {tuple(top_k_weights.shape)}"
        )
    activation = _activation(module)
    w1, w2, b1, b2 = _weights(module)
    plan = make_plan(experts_TK, weights_TK, weights_TK, E)  # dropless: priority unused
    forward = get_backend(backend, hidden_states.device, hidden_states.dtype)
    return forward(hidden_states, plan, w1, w2, b1, b2, activation)


def register(backend: str = "auto", name: str = NAME) -> str:
    """Add moekit to transformers' experts registry; models then take experts_implementation=name.

    backend: a moekit backend name, or "auto" (triton on CUDA, torch on the CPU).
    """
    if backend not in ("auto", *available_backends()):
        names = ", ".join(("auto", *available_backends()))
        raise ValueError(f"backend={backend!r} is not one of {names}")
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as err:
        raise ImportError(
            "experts_implementation needs transformers>=5: pip install 'moekit[hf]'"
        ) from err

    def forward(module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights):
        return experts_forward(module, hidden_states, top_k_index, top_k_weights, backend)

    ExpertsInterface.register(name, forward)
    return name
