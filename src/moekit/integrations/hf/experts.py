"""`experts_implementation="moekit"`: transformers' MoE experts computed by moekit's backends.

transformers 5 calls every experts module decorated with `use_experts_implementation` as
`fn(module, hidden_states [T, D], top_k_index [T, K], top_k_weights [T, K] or [T, E]) -> [T, D]`
with weights gate_up_proj [E, 2H, D] and down_proj [E, D, H] ([E, D, 2H] / [E, H, D] when
`is_transposed`). Here the routing becomes a moekit `Plan` and the weights are read through
transposed views (no copies) by stage 3 of the layer; gradients reach HF's parameters and the
router's weights through the backend's autograd. A module flag moekit cannot honour exactly
raises a ValueError naming it. Flags and activation are checked on a module's first call and
the backend object resolved once per (backend, device, dtype); it makes the plan and computes
the experts, as in the layer. At decode sizes host work is the cost, which is why inference
calls of up to `MoEConfig.graph_max_tokens` tokens on CUDA replay a CUDA graph of plan and
experts instead (`moekit.replay`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.backends import Backend, available_backends, get_backend
from moekit.config import MoEConfig
from moekit.dispatch import make_plan
from moekit.replay import GraphReplay
from moekit.types import ExpertWeights

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


def _weight_names(module: nn.Module) -> tuple[str, str, str | None, str | None]:
    """Names of w1, w2, b1, b2 on the module; flags moekit cannot honour are refused."""
    if getattr(module, "_is_expert_parallel", False):
        _refuse(module, "_is_expert_parallel", "is True; expert parallelism is not supported")
    if getattr(module, "has_post_expert_norm", False):
        _refuse(module, "has_post_expert_norm", "is True; a norm after each expert is unsupported")
    if module.has_gate and not getattr(module, "is_concatenated", True):
        _refuse(module, "is_concatenated", "is False; interleaved gate/up would need a copy")
    up = "gate_up_proj" if module.has_gate else "up_proj"
    if not module.has_bias:
        return up, "down_proj", None, None
    return up, "down_proj", f"{up}_bias", "down_proj_bias"


def _member(module: nn.Module, name: str, default: Any = None) -> Any:
    """module.<name>, read straight from its parameters or submodules when it is one of them
    (nn.Module.__getattr__ costs more than the rest of a call's host work)."""
    found = module._parameters.get(name)
    if found is None:
        found = module._modules.get(name)
    return found if found is not None else getattr(module, name, default)


def _views(
    module: nn.Module, names: tuple[str, str, str | None, str | None], transposed: bool
) -> ExpertWeights:
    """w1 [E, D, H1], w2 [E, H, D] as views of HF's parameters, b1 [E, H1], b2 [E, D] or None.

    Made on every call, never kept: a kept view would hold a weight's memory after the module
    swaps it (offloading hooks, `.to()`), and it costs two view ops per call.
    """
    up, down = _member(module, names[0]), _member(module, names[1])
    w1, w2 = (up, down) if transposed else (up.mT, down.mT)
    if names[2] is None:
        return ExpertWeights(w1, w2)
    return ExpertWeights(w1, w2, _member(module, names[2]), _member(module, names[3]))


def _weights(module: nn.Module) -> ExpertWeights:
    """`_views` of a module, its flags checked now."""
    return _views(module, _weight_names(module), bool(module.is_transposed))


class _Bound:
    """An experts module as moekit reads it, checked on its first call (activation, flags,
    weight names) so that later calls (a decode step makes one per layer) repeat none of it."""

    __slots__ = ("act_fn", "activation", "names", "transposed")

    def __init__(self, module: nn.Module) -> None:
        self.act_fn = _member(module, "act_fn")  # a new act_fn is checked again
        self.activation = _activation(module)
        self.names = _weight_names(module)
        self.transposed = bool(module.is_transposed)


# id(module) -> its _Bound and resolved backends; an entry goes when its module is collected
_BOUND: dict[int, tuple[_Bound, dict]] = {}


def _bound(module: nn.Module) -> tuple[_Bound, dict]:
    """The module's binding and its {(backend, device, dtype): Backend} cache."""
    key = id(module)
    entry = _BOUND.get(key)
    if entry is not None and entry[0].act_fn is _member(module, "act_fn"):
        return entry
    bound = _Bound(module)  # a refused module raises here and is never kept
    if entry is None:
        weakref.finalize(module, _BOUND.pop, key, None)
    entry = _BOUND[key] = (bound, {})
    return entry


def experts_forward(
    module: nn.Module,
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    backend: str = "auto",
    graph_max_tokens: int = MoEConfig.graph_max_tokens,
) -> Tensor:
    """The experts of an HF MoE block on moekit's stage 3: [T, D] -> [T, D] in the input dtype."""
    T, K = top_k_index.shape
    E = module.num_experts
    experts_TK = top_k_index if top_k_index.dtype == torch.long else top_k_index.long()
    if top_k_weights.shape == (T, K):
        weights_TK = top_k_weights
    elif top_k_weights.shape == (T, E):  # dense router scores: each slot reads its expert's
        weights_TK = top_k_weights.gather(1, experts_TK)
    else:
        raise ValueError(
            f"top_k_weights must be [T, K] = [{T}, {K}] or [T, E] = [{T}, {E}], "
            f"got {tuple(top_k_weights.shape)}"
        )
    bound, cache = _bound(module)
    replay = cache.get(("replay", backend))
    if replay is None:
        replay = cache[("replay", backend)] = _graph_replay(module, backend, graph_max_tokens)
    if replay.usable(hidden_states, experts_TK, weights_TK):  # a decode step: one replay
        out = replay(hidden_states, experts_TK, weights_TK)
        if out is not None:
            return out[0]
    return _compute(module, bound, cache, backend, hidden_states, experts_TK, weights_TK)


def _compute(
    module: nn.Module,
    bound: _Bound,
    cache: dict,
    backend: str,
    hidden_states: Tensor,
    experts_TK: Tensor,
    weights_TK: Tensor,
) -> Tensor:
    """Plan and stage 3 with the module's weights, both on the one backend object: y [T, D]."""
    where = (backend, hidden_states.device, hidden_states.dtype)
    chosen: Backend | None = cache.get(where)
    if chosen is None:
        chosen = cache[where] = get_backend(*where)
    E = module.num_experts
    plan = make_plan(experts_TK, weights_TK, weights_TK, E, backend=chosen)  # dropless
    w = _views(module, bound.names, bound.transposed)
    return chosen.forward(hidden_states, plan, w, bound.activation)


def _graph_replay(module: nn.Module, backend: str, max_tokens: int) -> GraphReplay:
    """Small inference batches of this module from CUDA graphs (`moekit.replay`); padded rows
    route to expert 0 with weight 0. Holds the module weakly: the cache must not keep it."""
    ref = weakref.ref(module)

    def run(hidden_states: Tensor, experts_TK: Tensor, weights_TK: Tensor) -> tuple[Tensor]:
        m = ref()
        bound, cache = _bound(m)
        return (_compute(m, bound, cache, backend, hidden_states, experts_TK, weights_TK),)

    def state() -> tuple[Tensor, ...]:
        m = ref()
        bound = _bound(m)[0]
        w = _views(m, bound.names, bound.transposed)
        return tuple(t for t in w.tensors if t is not None)

    return GraphReplay(run, state, max_tokens)


def register(
    backend: str = "auto", name: str = NAME, graph_max_tokens: int = MoEConfig.graph_max_tokens
) -> str:
    """Add moekit to transformers' experts registry; models then take experts_implementation=name.

    backend: a moekit backend name, or "auto" (triton on CUDA, torch on the CPU).
    graph_max_tokens: inference calls up to this many tokens on CUDA replay a CUDA graph, as
    `MoEConfig.graph_max_tokens` does for the layer (0 = never).
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
        return experts_forward(
            module, hidden_states, top_k_index, top_k_weights, backend, graph_max_tokens
        )

    ExpertsInterface.register(name, forward)
    return name
