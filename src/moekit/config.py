"""Dataclass configs for the MoE layer: frozen values, validated at construction.

Every field that can be wrong raises ``ValueError`` naming the field and, for choices, the
allowed values, so a bad config fails before any tensor is made. Names of registered
components (router, expert and backend kinds) are checked where the component is built.
YAML, config.json and the CLI turn dicts into configs through one builder, `from_dict`.
"""

from __future__ import annotations

import functools
import math
import re
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

from moekit.types import ACTIVATIONS, GATED_ACTIVATIONS, capacity

NOISES = ("none", "gaussian", "gumbel", "jitter")
PRE_NORMS = ("none", "rms", "layer")
# options a router schedule may anneal: capacity_factor is MoEConfig's, the rest RouterConfig's
SCHEDULED = ("temperature", "noise_std", "capacity_factor")
INITS = ("normal", "xavier", "depth_scaled", "xavier_normal", "kaiming_uniform", "kaiming_normal")
FALLBACKS = ("zero", "dense")


def from_dict(cls: type, data: Any, what: str) -> Any:
    """cls built from a plain dict (YAML, config.json, CLI): the one dict -> config builder.

    Keys that are not init fields raise a ValueError naming them (`what` says whose keys);
    old keys are migrated first (MIGRATIONS, with a warning); nested dataclass fields given
    as dicts are built by this function too, from the field's own `__post_init__`.
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a mapping, got {data!r}")
    data = dict(data)
    for migrate in MIGRATIONS.get(cls, ()):
        data = migrate(data)
    names = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {what}: {', '.join(unknown)}")
    return cls(**data)


def migrated(cls: type, data: Any) -> Any:
    """`data` with the old keys of cls and of its nested configs moved to the new ones
    (MIGRATIONS, each with its warning) and nothing built: what a parser of the new keys reads."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for migrate in MIGRATIONS.get(cls, ()):
        data = migrate(data)
    hints = _hints(cls)
    for f in fields(cls):
        target = _dataclass_of(hints[f.name])
        if target is not None and isinstance(data.get(f.name), dict):
            data[f.name] = migrated(target, data[f.name])
    return data


def build_nested(obj: Any, prefix: str = "") -> None:
    """In a frozen config's __post_init__: dataclass-typed fields given as dicts built in place.

    A field whose annotation also admits a dict (router options) is left as given.
    """
    hints = _hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        if not isinstance(value, dict):
            continue
        target = _dataclass_of(hints[f.name])
        if target is None:
            continue
        label = f"{prefix}{f.name}"
        try:
            built = from_dict(target, value, f"{label} key(s)")
        except (TypeError, ValueError) as err:
            text = str(err)
            raise ValueError(text if label in text else f"{label}: {text}") from err
        object.__setattr__(obj, f.name, built)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_of(hint: Any) -> type | None:
    """The one dataclass a field annotation names (X or X | None), else None."""
    if isinstance(hint, type):
        return hint if is_dataclass(hint) else None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if any(typing.get_origin(a) is dict or a is dict for a in args):
            return None
        found = [a for a in args if isinstance(a, type) and is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value!r} must be finite and {bound}")


def _probability(name: str, value: float) -> None:
    """A dropout rate: a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"{name}={value!r} must be in [0, 1)")


SHAPES = ("linear", "cosine")
_SCHEDULE_TEXT = re.compile(
    r"^\s*(?P<start>\S+)\s*->\s*(?P<end>\S+)\s+over\s+(?P<steps>\d+)(?:\s+steps?)?"
    r"(?:\s+(?P<shape>linear|cosine))?\s*$"
)


@dataclass(frozen=True)
class Schedule:
    """A router option annealed start -> end over `steps` optimiser steps, then held at `end`.

    Written in a config as ``"2.0 -> 1.0 over 1000"`` (optionally ``"... cosine"``) or as a
    dict of the fields. `every` holds each value for that many steps: under torch.compile an
    option that is a Python number (the capacity factor) compiles once per distinct value.
    """

    start: float
    end: float
    steps: int
    shape: str = "linear"  # linear | cosine (half-cosine)
    every: int = 1

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"schedule {name}={value!r} must be a number")
            if not math.isfinite(value):
                raise ValueError(f"schedule {name}={value!r} must be finite")
            object.__setattr__(self, name, float(value))
        for name in ("steps", "every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"schedule {name}={value!r} must be an integer >= 1")
        if self.shape not in SHAPES:
            raise ValueError(f"schedule shape={self.shape!r} is not one of {SHAPES}")

    def value(self, step: int) -> float:
        """The value before optimiser step `step` (0-based)."""
        held = step - step % self.every
        progress = min(1.0, max(0, held) / self.steps)
        if self.shape == "cosine":
            progress = 0.5 * (1.0 - math.cos(math.pi * progress))
        return self.start + (self.end - self.start) * progress

    @classmethod
    def parse(cls, value: Schedule | str | dict[str, Any], name: str) -> Schedule:
        """A schedule from its text form, a dict of fields or itself; ValueError naming `name`."""
        if isinstance(value, Schedule):
            return value
        try:
            if isinstance(value, str):
                match = _SCHEDULE_TEXT.match(value)
                if match is None:
                    raise ValueError("write it as 'START -> END over STEPS [linear|cosine]'")
                parts = match.groupdict()
                return cls(
                    float(parts["start"]),
                    float(parts["end"]),
                    int(parts["steps"]),
                    parts["shape"] or "linear",
                )
            if isinstance(value, dict):
                return from_dict(cls, value, "key(s)")
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}={value!r}: {err}") from None
        raise ValueError(f"{name}={value!r} must be a schedule string, a dict or a Schedule")

    def __str__(self) -> str:
        text = f"{self.start:g} -> {self.end:g} over {self.steps}"
        return text if self.shape == "linear" else f"{text} {self.shape}"


@dataclass(frozen=True)
class RouterOptions:
    """Base of every router's own options (`RouterConfig.options`); a router without any uses it."""


# flat keys of the first RouterConfig, now options of one router:
# old key -> (kind, options key, the default old config.json files hold)
LEGACY_ROUTER_KEYS = {
    "bias_update_rate": ("sigmoid", "bias_update_rate", 1e-3),
    "expert_choice_capacity": ("expert_choice", "capacity_factor", 1.0),
    "sinkhorn_iters": ("sinkhorn", "iters", 50),
    "sinkhorn_tau": ("sinkhorn", "tau", 0.05),
    "sinkhorn_candidates": ("sinkhorn", "candidates", None),
    "attention_heads": ("attention", "heads", 4),
    "attention_dim": ("attention", "dim", 32),
}


def _migrate_router_keys(data: dict[str, Any]) -> dict[str, Any]:
    """Old flat router keys moved into `options`; one DeprecationWarning names them all.

    A key of another router had no effect before and still has none: it is dropped, with a
    warning only when it differs from that router's default (old config.json files hold all).
    """
    legacy = {old: data.pop(old) for old in LEGACY_ROUTER_KEYS if old in data}
    kind = data.get("kind", "topk")
    renamed, notes = {}, []
    for old, value in legacy.items():
        owner, new, default = LEGACY_ROUTER_KEYS[old]
        if value is None:
            continue
        if owner == kind:
            renamed[new] = value
            notes.append(f"router.{old} is now router.options.{new}")
        elif value != default:
            notes.append(
                f"router.{old}={value!r} is ignored with router.kind={kind!r} "
                f"(it is router.options.{new} of kind {owner!r})"
            )
    if notes:
        warnings.warn("; ".join(notes), DeprecationWarning, stacklevel=3)
    if renamed:
        given = data.get("options")
        if isinstance(given, RouterOptions):
            given = asdict(given)
        if given is not None and not isinstance(given, dict):
            raise ValueError(f"router.options must be a dict, got {given!r}")
        twice = sorted(set(renamed) & set(given or {}))
        if twice:
            raise ValueError(
                f"router.options.{twice[0]} is also set by its old flat key: set only the new one"
            )
        data["options"] = {**(given or {}), **renamed}
    return data


# per config class, the functions from_dict runs on its dict before building it
MIGRATIONS: dict[type, tuple[Callable[[dict[str, Any]], dict[str, Any]], ...]] = {}


@dataclass(frozen=True)
class RouterConfig:
    """How tokens pick experts, and the auxiliary losses every router reports.

    Options that belong to one router live in `options`: that router's own dataclass, or a
    dict of its fields (YAML, config.json) that the router builds when it is made.
    """

    kind: str = "topk"  # a registered router (`moekit.register_router`), checked when built
    temperature: float = 1.0  # logits / temperature before scoring
    noise: str = "none"  # training-only: none | gaussian | gumbel (on logits) | jitter (on x)
    noise_std: float = 1.0
    dropout: float = 0.0  # training only: dropout on the router's input (experts see x as is)
    # the router's input norm: "rms" (RMSNorm, own weight) or "layer" (LayerNorm, own weight
    # and bias); experts see x as is
    pre_norm: str = "none"
    # training only: each chosen slot is dropped with this probability and the survivors'
    # weights are scaled by 1 / (1 - p), so a token's expected output is unchanged
    expert_dropout: float = 0.0
    # options the trainer anneals, by name (SCHEDULED): "2.0 -> 1.0 over 1000" or a dict,
    # parsed into `Schedule`s. The router holds the live value (`Router.set_step`); a router
    # built outside training starts at each schedule's end, what the trained model serves with
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

    def __post_init__(self) -> None:
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
            _probability(f"router.{name}", getattr(self, name))
        self._check_schedules()
        if self.n_groups < 1:
            raise ValueError(f"router.n_groups={self.n_groups} must be >= 1")
        n_sets = self.n_groups if self.constellations is None else len(self.constellations)
        if not 1 <= self.topk_groups <= n_sets:
            raise ValueError(
                f"router.topk_groups={self.topk_groups} must be in [1, {n_sets}] "
                f"(n_groups={self.n_groups}, or the number of constellations)"
            )
        options = self.options
        if options is not None and not isinstance(options, RouterOptions | dict):
            raise ValueError(f"router.options must be a dict or a RouterOptions, got {options!r}")
        if self.constellations is not None:
            self._check_constellations()

    def _check_schedules(self) -> None:
        """Parse each schedule and check its values are ones the option may take."""
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
        object.__setattr__(self, "schedules", parsed or None)

    def _check_constellations(self) -> None:
        """Non-empty, disjoint groups of expert ids; exclusive with equal groups."""
        if self.n_groups != 1:
            raise ValueError("router.constellations and router.n_groups > 1 are exclusive")
        groups = [list(group) for group in self.constellations]
        object.__setattr__(self, "constellations", groups)
        ids = [e for group in groups for e in group]
        if not groups or not all(groups):
            raise ValueError("router.constellations must be non-empty groups of expert ids")
        if any(not isinstance(e, int) or e < 0 for e in ids) or len(set(ids)) != len(ids):
            raise ValueError("router.constellations must hold distinct expert ids >= 0")


MIGRATIONS[RouterConfig] = (_migrate_router_keys,)


@dataclass(frozen=True)
class ExpertConfig:
    """The expert MLP: activation, biases and initialisation."""

    kind: str = "mlp"  # a registered expert class (`moekit.register_expert`), checked when built
    activation: str = "swiglu"
    bias: bool = False
    # normal(init_std) | depth_scaled: init_std / sqrt(2 * n_layers) on w2 | xavier (uniform),
    # xavier_normal, kaiming_uniform, kaiming_normal: from each expert matrix's fans
    init: str = "normal"
    init_std: float = 0.02
    n_layers: int = 1  # depth used by depth_scaled init
    # training only: dropout on each expert's hidden activation (before w2); the routed
    # experts then run expert by expert in torch, as the fused backends do not apply it
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _choice("expert.activation", self.activation, ACTIVATIONS)
        _choice("expert.init", self.init, INITS)
        _positive("expert.init_std", self.init_std)
        if self.n_layers < 1:
            raise ValueError(f"expert.n_layers={self.n_layers} must be >= 1")
        _probability("expert.dropout", self.dropout)

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS


@dataclass(frozen=True)
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
    backend: str = "auto"  # "auto" or a backend name, checked when the layer is built
    fallback: str = "zero"  # tokens that lost every expert: zero output, or a small dense FFN
    fallback_weight: float = 1.0  # scales the dense fallback's output (fallback="dense")
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
        build_nested(self)
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
        if not isinstance(self.backend, str) or not self.backend:
            raise ValueError(f"backend={self.backend!r} must be 'auto' or a backend name")
        _choice("fallback", self.fallback, FALLBACKS)
        _positive("fallback_weight", self.fallback_weight, allow_zero=True)
        if self.fallback_weight != 1.0 and self.fallback != "dense":
            raise ValueError(f"fallback_weight={self.fallback_weight!r} needs fallback='dense'")
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
        """Per-expert capacity C = ceil(cf * T * k / E) at the configured cf, or None."""
        return capacity(n_tokens, self.k, self.n_experts, self.capacity_factor)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEConfig:
        return from_dict(cls, data, "MoEConfig field(s)")
