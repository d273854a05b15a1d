"""Dataclass configs for the MoE layer, validated at construction.

Every field that can be wrong raises ``ValueError`` naming the field and, for
choices, the allowed values, so a bad config fails before any tensor is made.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import InitVar, asdict, dataclass, field, fields
from typing import Any

from moekit.types import ACTIVATIONS, GATED_ACTIVATIONS, capacity

NOISES = ("none", "gaussian", "gumbel", "jitter")
PRE_NORMS = ("none", "rms")
# options a router schedule may anneal: capacity_factor is MoEConfig's, the rest RouterConfig's
SCHEDULED = ("temperature", "noise_std", "capacity_factor")
INITS = ("normal", "xavier", "depth_scaled")
FALLBACKS = ("zero", "dense")


def strict_from_dict(cls: type, data: dict[str, Any], what: str) -> Any:
    """cls(**data), refusing keys that are not init arguments with a ValueError naming them."""
    unknown = sorted(set(data) - set(inspect.signature(cls).parameters))
    if unknown:
        raise ValueError(f"unknown {what}: {', '.join(unknown)}")
    return cls(**data)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value!r} must be finite and {bound}")


@dataclass
class RouterOptions:
    """Base of every router's own options (`RouterConfig.options`); a router without any uses it."""


# flat keys of the first RouterConfig, now options of one router: old key -> (kind, options key)
LEGACY_ROUTER_KEYS = {
    "bias_update_rate": ("sigmoid", "bias_update_rate"),
    "expert_choice_capacity": ("expert_choice", "capacity_factor"),
    "sinkhorn_iters": ("sinkhorn", "iters"),
    "sinkhorn_tau": ("sinkhorn", "tau"),
    "sinkhorn_candidates": ("sinkhorn", "candidates"),
    "attention_heads": ("attention", "heads"),
    "attention_dim": ("attention", "dim"),
}


@dataclass
class RouterConfig:
    """How tokens pick experts, and the auxiliary losses every router reports.

    Options that belong to one router live in `options`: that router's own dataclass, built
    from a dict (YAML, config.json) by looking `kind` up in the router registry.
    """

    kind: str = "topk"
    temperature: float = 1.0  # logits / temperature before scoring
    noise: str = "none"  # training-only: none | gaussian | gumbel (on logits) | jitter (on x)
    noise_std: float = 1.0
    dropout: float = 0.0  # training only: dropout on the router's input (experts see x as is)
    pre_norm: str = "none"  # "rms": RMSNorm (with its own weight) of the router's input
    # training only: each chosen slot is dropped with this probability and the survivors'
    # weights are scaled by 1 / (1 - p), so a token's expected output is unchanged
    expert_dropout: float = 0.0
    # options the trainer anneals, by name (SCHEDULED): "2.0 -> 1.0 over 1000" or a dict;
    # the option itself holds the value now (the end value once the anneal is over); the
    # values become moekit.routing.schedule.Schedule objects
    schedules: dict[str, Any] | None = None
    # selected weights sum to 1 for every k, so top-1 weighs 1.0 (Mixtral; HF norm_topk_prob);
    # False keeps the raw scores (Switch Transformer's top-1, Qwen/OLMoE defaults)
    renormalize: bool = True
    scaling_factor: float = 1.0  # multiplies the final weights (DeepSeek routed_scaling_factor)
    # loss weights; components are reported unweighted in metrics whatever these are
    load_balance_weight: float = 0.01  # Switch Transformer eq. 4
    z_loss_weight: float = 1e-3  # ST-MoE router z-loss
    entropy_weight: float = 0.0
    seq_balance_weight: float = 0.0  # DeepSeek-V3 sequence-wise balance loss
    # group-limited selection (DeepSeek-V2/V3): experts in n_groups groups, keep topk_groups
    n_groups: int = 1
    topk_groups: int = 1
    # constellations: expert groups of any sizes (a partition of the experts, e.g. from
    # MoE.constellations); routers with `supports_constellations` keep each token's best
    # topk_groups of them
    constellations: list[list[int]] | None = None
    options: RouterOptions | dict[str, Any] | None = None  # None = the kind's defaults
    # deprecated flat keys, in LEGACY_ROUTER_KEYS order: mapped into `options` with a warning
    bias_update_rate: InitVar[float | None] = None
    expert_choice_capacity: InitVar[float | None] = None
    sinkhorn_iters: InitVar[int | None] = None
    sinkhorn_tau: InitVar[float | None] = None
    sinkhorn_candidates: InitVar[int | None] = None
    attention_heads: InitVar[int | None] = None
    attention_dim: InitVar[int | None] = None

    def __post_init__(self, *legacy: Any) -> None:
        from moekit.routing import available_routers, router_class

        _choice("router.kind", self.kind, available_routers())
        _choice("router.noise", self.noise, NOISES)
        _positive("router.temperature", self.temperature)
        _positive("router.noise_std", self.noise_std, allow_zero=True)
        for name in (
            "load_balance_weight",
            "z_loss_weight",
            "entropy_weight",
            "seq_balance_weight",
        ):
            _positive(f"router.{name}", getattr(self, name), allow_zero=True)
        _positive("router.scaling_factor", self.scaling_factor)
        _choice("router.pre_norm", self.pre_norm, PRE_NORMS)
        for name in ("dropout", "expert_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
                raise ValueError(f"router.{name}={value!r} must be in [0, 1)")
        self._check_schedules()
        if self.n_groups < 1:
            raise ValueError(f"router.n_groups={self.n_groups} must be >= 1")
        n_sets = self.n_groups if self.constellations is None else len(self.constellations)
        if not 1 <= self.topk_groups <= n_sets:
            raise ValueError(
                f"router.topk_groups={self.topk_groups} must be in [1, {n_sets}] "
                f"(n_groups={self.n_groups}, or the number of constellations)"
            )
        self.options = self._build_options(dict(zip(LEGACY_ROUTER_KEYS, legacy, strict=True)))
        if self.constellations is not None:
            if not router_class(self.kind).supports_constellations:
                raise ValueError(
                    f"router.constellations: router.kind={self.kind!r} does not support them"
                )
            self._check_constellations()

    def _check_schedules(self) -> None:
        """Parse each schedule and check its values are ones the option may take."""
        from moekit.routing.schedule import Schedule

        if self.schedules is None:
            return
        if not isinstance(self.schedules, dict):
            raise ValueError(f"router.schedules={self.schedules!r} must map option names")
        parsed = {}
        for name, value in self.schedules.items():
            _choice("router.schedules key", name, SCHEDULED)
            key = f"router.schedules.{name}"
            schedule = Schedule.parse(value, key)
            for end in ("start", "end"):
                _positive(f"{key}.{end}", getattr(schedule, end), allow_zero=name == "noise_std")
            parsed[name] = schedule
        if "noise_std" in parsed and self.noise == "none":
            raise ValueError("router.schedules.noise_std needs router.noise other than 'none'")
        self.schedules = parsed or None

    def _build_options(self, legacy: dict[str, Any]) -> RouterOptions:
        """The kind's options dataclass from None, a dict, or options (of any router) by name."""
        from moekit.routing import router_options

        options_type = router_options(self.kind)
        renamed = _renamed_legacy_keys(self.kind, legacy)
        given = self.options
        if type(given) is options_type and not renamed:
            return given
        if isinstance(given, RouterOptions):
            given = asdict(given)
        if given is not None and not isinstance(given, dict):
            raise ValueError(
                f"router.options must be a dict or {options_type.__name__}, got {given!r}"
            )
        data = dict(given or {})
        twice = sorted(set(renamed) & set(data))
        if twice:
            raise ValueError(
                f"router.options.{twice[0]} is also set by its old flat key: set only the new one"
            )
        data.update(renamed)
        try:
            what = f"router.options key(s) of kind {self.kind!r}"
            return strict_from_dict(options_type, data, what)
        except ValueError as err:
            if not renamed:
                raise
            old = [f"router.{o}" for o, (k, new) in LEGACY_ROUTER_KEYS.items() if new in renamed]
            raise ValueError(f"{err} (given as {', '.join(old)})") from err

    def _check_constellations(self) -> None:
        """Non-empty, disjoint groups of expert ids; exclusive with equal groups."""
        if self.n_groups != 1:
            raise ValueError("router.constellations and router.n_groups > 1 are exclusive")
        self.constellations = [list(group) for group in self.constellations]
        ids = [e for group in self.constellations for e in group]
        if not self.constellations or not all(self.constellations):
            raise ValueError("router.constellations must be non-empty groups of expert ids")
        if any(not isinstance(e, int) or e < 0 for e in ids) or len(set(ids)) != len(ids):
            raise ValueError("router.constellations must hold distinct expert ids >= 0")


def _renamed_legacy_keys(kind: str, legacy: dict[str, Any]) -> dict[str, Any]:
    """Deprecated flat keys given for `kind`, by their options name; one warning names them all.

    A key of another router had no effect before and still has none; it is dropped, with a
    warning only when it differs from that router's default (old config.json files hold all).
    """
    from moekit.routing import available_routers, router_options

    renamed, notes = {}, []
    for old, value in legacy.items():
        owner, new = LEGACY_ROUTER_KEYS[old]
        if value is None:
            continue
        if owner == kind:
            renamed[new] = value
            notes.append(f"router.{old} is now router.options.{new}")
        elif owner in available_routers():
            default = {f.name: f.default for f in fields(router_options(owner))}[new]
            if value != default:
                notes.append(
                    f"router.{old}={value!r} is ignored with router.kind={kind!r} "
                    f"(it is router.options.{new} of kind {owner!r})"
                )
    if notes:
        warnings.warn("; ".join(notes), DeprecationWarning, stacklevel=5)
    return renamed


@dataclass
class ExpertConfig:
    """The expert MLP: activation, biases and initialisation."""

    kind: str = "mlp"  # a registered expert class (`moekit.register_expert`)
    activation: str = "swiglu"
    bias: bool = False
    init: str = "normal"  # normal(std) | xavier | depth_scaled: std / sqrt(2 * n_layers) on w2
    init_std: float = 0.02
    n_layers: int = 1  # depth used by depth_scaled init

    def __post_init__(self) -> None:
        from moekit.experts import available_experts

        _choice("expert.kind", self.kind, available_experts())
        _choice("expert.activation", self.activation, ACTIVATIONS)
        _choice("expert.init", self.init, INITS)
        _positive("expert.init_std", self.init_std)
        if self.n_layers < 1:
            raise ValueError(f"expert.n_layers={self.n_layers} must be >= 1")

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS


@dataclass
class MoEConfig:
    """One MoE layer: sizes, routing, capacity, experts and the compute backend."""

    d_model: int = 512
    d_hidden: int = 1024
    n_experts: int = 8
    k: int = 2
    capacity_factor: float | None = None  # None = dropless; C = ceil(cf * T * k / E)
    n_shared_experts: int = 0  # always-on experts added to the routed output (DeepSeek/Qwen)
    shared_gate: bool = False  # shared output scaled by sigmoid(x @ gate) per token (Qwen2-MoE)
    router: RouterConfig = field(default_factory=RouterConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    backend: str = "auto"
    fallback: str = "zero"  # tokens that lost every expert: zero output, or a small dense FFN
    renormalize_after_drop: bool = False  # rescale a token's surviving weights to its pre-drop sum
    debug: bool = False  # NaN/inf checks on inputs (host sync; never on by default)
    track_coactivation: bool = False  # count experts chosen together into MoE.coactivation
    # inference only (ignored in training): merge a token's experts whose outputs have
    # cosine >= threshold onto the highest-weight one (moekit.librarian)
    dedup_threshold: float | None = None
    # inference on CUDA: batches of <= this many tokens replay a CUDA graph of the layer
    # (moekit.replay) instead of launching its kernels one by one; 0 = never
    graph_max_tokens: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.router, dict):
            self.router = strict_from_dict(RouterConfig, self.router, "router key(s)")
        if isinstance(self.expert, dict):
            self.expert = strict_from_dict(ExpertConfig, self.expert, "expert key(s)")
        from moekit.backends import available_backends

        for name in ("d_model", "d_hidden", "n_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if not isinstance(self.k, int) or not 1 <= self.k <= self.n_experts:
            raise ValueError(f"k={self.k!r} must be an integer in [1, n_experts={self.n_experts}]")
        if self.capacity_factor is not None:
            _positive("capacity_factor", self.capacity_factor)
        if self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts={self.n_shared_experts} must be >= 0")
        if self.shared_gate and not self.n_shared_experts:
            raise ValueError("shared_gate=True needs n_shared_experts >= 1")
        _choice("backend", self.backend, ("auto", *available_backends()))
        _choice("fallback", self.fallback, FALLBACKS)
        if not isinstance(self.graph_max_tokens, int) or self.graph_max_tokens < 0:
            raise ValueError(f"graph_max_tokens={self.graph_max_tokens!r} must be an integer >= 0")
        if self.dedup_threshold is not None and not 0 < self.dedup_threshold <= 1:
            raise ValueError(f"dedup_threshold={self.dedup_threshold!r} must be in (0, 1]")
        if self.n_experts % self.router.n_groups:
            raise ValueError(
                f"router.n_groups={self.router.n_groups} must divide n_experts={self.n_experts}"
            )
        if self.router.constellations is not None:
            self._check_constellations()
        experts_per_group = self.n_experts // self.router.n_groups
        if self.k > self.router.topk_groups * experts_per_group:
            raise ValueError(
                f"k={self.k} exceeds the experts reachable in router.topk_groups="
                f"{self.router.topk_groups} groups of {experts_per_group}"
            )

    def _check_constellations(self) -> None:
        """Constellations partition the experts and every token can still reach k of them."""
        groups = self.router.constellations or []
        if sorted(e for group in groups for e in group) != list(range(self.n_experts)):
            raise ValueError(
                f"router.constellations must partition the n_experts={self.n_experts} experts"
            )
        reachable = sum(sorted(len(g) for g in groups)[: self.router.topk_groups])
        if self.k > reachable:
            raise ValueError(
                f"k={self.k} exceeds the {reachable} experts of the smallest "
                f"router.topk_groups={self.router.topk_groups} constellations"
            )

    def capacity(self, n_tokens: int) -> int | None:
        """Per-expert capacity C = ceil(cf * T * k / E), or None when dropless."""
        return capacity(n_tokens, self.k, self.n_experts, self.capacity_factor)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEConfig:
        return strict_from_dict(cls, data, "MoEConfig field(s)")
