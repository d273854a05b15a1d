"""`MoE`: the Mixture-of-Experts layer, one straight line: route -> plan -> dispatch -> experts
-> combine -> finish.

The layer wires components that do not know each other: a router (`moekit.routing`), a
backend (`moekit.backends`, resolved once per device and dtype), and a dispatcher that moves
the rows (`dispatch.LocalDispatcher` here; expert parallelism swaps in an all-to-all one).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import fields, replace
from functools import partial

import torch
from torch import Tensor, nn

from moekit.backends.base import Backend, Bound, check_backend, get_backend
from moekit.config import MoEConfig, RouterConfig
from moekit.dispatch import Dispatcher, LocalDispatcher, make_plan
from moekit.experts import DenseMLP, Experts, GatedDenseMLP, build_experts
from moekit.librarian import deduplicate
from moekit.ranges import stage
from moekit.replay import GraphReplay
from moekit.routing import build_router
from moekit.routing.coactivation import coactivation_counts, find_constellations
from moekit.routing.losses import router_losses, routing_metrics, weighted_aux_loss
from moekit.types import ExpertWeights, Plan, Routing


class MoEInfo:
    """What a forward pass reports besides y, each part computed when first read.

    aux_loss: scalar, already weighted by the router config. metrics: tensors (expert_load [E],
    dropped_fraction, router_entropy, router_z, unweighted loss parts, and `capacity`, the
    per-expert C, only when a capacity factor drops slots: a dropless layer has no C, and a
    0 would read as "no room"). routing: experts
    [T, K] (-1 in dropped / empty slots) and weights [T, K] as actually used.

    Inference that reads none of them pays nothing: at decode sizes the losses and metrics
    are tens of small kernels, more than the experts themselves.
    """

    def __init__(
        self,
        routed: Routing,
        kept_TK: Tensor,
        weights_TK: Tensor,
        router: RouterConfig,
        lead: tuple[int, ...],
        extra: dict[str, Tensor] | None = None,
        capacity: int | None = None,
    ) -> None:
        self._routed = routed  # as the router chose, before capacity drops
        self._kept_TK = kept_TK
        self._weights_TK = weights_TK
        self._router = router
        self._lead = lead
        self._extra = extra or {}
        self._capacity = capacity
        self._losses: dict[str, Tensor] | None = None
        self._aux: Tensor | None = None
        self._metrics: dict[str, Tensor] | None = None
        self._routing: Routing | None = None

    @property
    def losses(self) -> dict[str, Tensor]:
        """Unweighted loss parts (load_balance, z_loss, entropy, seq_balance)."""
        if self._losses is None:
            self._losses = router_losses(self._routed, self._lead)
        return self._losses

    @property
    def aux_loss(self) -> Tensor:
        if self._aux is None:
            self._aux = weighted_aux_loss(self.losses, self._router)
        return self._aux

    @property
    def metrics(self) -> dict[str, Tensor]:
        if self._metrics is None:
            E = self._routed.logits.shape[-1]
            self._metrics = routing_metrics(self._routed, self._kept_TK, E, self.losses)
            self._metrics.update(self._extra)
            if self._capacity is not None:  # float32 like the other metrics; a fill, no copy
                C = float(self._capacity)
                self._metrics["capacity"] = torch.full((), C, device=self._kept_TK.device)
        return self._metrics

    @property
    def routing(self) -> Routing:
        if self._routing is None:
            self._routing = replace(
                self._routed,
                experts=torch.where(self._kept_TK, self._routed.experts, -1),
                weights=self._weights_TK,
            )
        return self._routing


def check_input(x: Tensor, d_model: int) -> None:
    """Shape and dtype checks: metadata only, never a host sync."""
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != d_model:
        raise ValueError(
            f"x's last dimension must be d_model={d_model}, got shape {tuple(x.shape)}"
        )


def expert_dtype(x: Tensor) -> torch.dtype:
    """The dtype stage 3 runs in: autocast's for float32 x when autocast is on for its device,
    else x's. The expert GEMMs then run in bf16 / fp16 under autocast as an nn.Linear's would;
    backends are custom ops that autocast does not reach."""
    device_type = x.device.type
    if device_type not in ("cuda", "cpu") or x.dtype != torch.float32:
        return x.dtype
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class _PerExpert(Backend):
    """Stage 3 of a registered expert kind with math of its own: one `expert` call per expert."""

    def __init__(self, experts: Experts) -> None:
        self.experts = experts

    def per_slot(
        self, x_SD: Tensor, offsets_E1: Tensor, w: ExpertWeights | None, activation: str
    ) -> Tensor:
        return self.experts.per_slot(x_SD, offsets_E1)


def _sync_check_finite(x: Tensor) -> None:
    """Debug-only NaN/inf check. NOTE: host sync (MoEConfig.debug=True)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf (checked because MoEConfig.debug=True)")


class MoE(nn.Module):
    """A drop-in MoE feed-forward layer: x [..., D] -> (y [..., D], MoEInfo)."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        check_backend(cfg.backend)
        self.router = build_router(cfg)
        self.experts = build_experts(cfg.n_experts, cfg.d_model, cfg.d_hidden, cfg.expert)
        n_shared = cfg.n_shared_experts
        shared = GatedDenseMLP if cfg.shared_gate else DenseMLP
        self.shared = shared(cfg.d_model, n_shared * cfg.d_hidden, cfg.expert) if n_shared else None
        self.fallback = (
            DenseMLP(cfg.d_model, cfg.d_hidden, cfg.expert) if cfg.fallback == "dense" else None
        )
        if cfg.track_coactivation:  # [E, E] tokens that chose both i and j; diagonal: chose i
            E = cfg.n_experts
            self.register_buffer("coactivation", torch.zeros(E, E, dtype=torch.float32))
        self.dispatcher: Dispatcher = LocalDispatcher()
        self._backend: Backend | None = None  # resolved by `backend` for _backend_key
        self._backend_key: tuple | None = None
        self.replay = (
            GraphReplay(self._replayed, self._state, cfg.graph_max_tokens)
            if cfg.graph_max_tokens and self._rows_independent()
            else None
        )

    @property
    def batch_invariant(self) -> bool:
        """Whether each token's output depends on its own input alone: the router's class says
        so and no capacity limit makes tokens compete. Batching, padding, chunking and prefix
        reuse then leave every output as it would be alone."""
        drops = self.router.capacity_factor is not None and self.router.uses_capacity
        return not drops and bool(getattr(type(self.router), "batch_invariant", False))

    def _rows_independent(self) -> bool:
        """Batch-invariant with no side effect or host sync in the forward: then small batches
        may replay a padded graph."""
        c = self.cfg
        side_effects = c.debug or c.track_coactivation or c.dedup_threshold is not None
        return self.batch_invariant and not side_effects

    def _state(self) -> Iterator[Tensor]:
        return itertools.chain(self.parameters(), self.buffers())

    def _replayed(self, x_TD: Tensor) -> tuple[Tensor, ...]:
        """The inference forward as flat tensors, for `GraphReplay`."""
        y_TD, routing, plan, _ = self.stages(x_TD)
        parts = tuple(getattr(routing, f.name) for f in fields(Routing))
        return (y_TD, plan.kept_TK, plan.weights_TK, *parts)

    def backend(self, x_TD: Tensor) -> Backend:
        """The configured backend for x's device and stage 3's dtype (`expert_dtype`), resolved
        once per (device, dtype)."""
        key = (self.cfg.backend, x_TD.device, expert_dtype(x_TD))
        if self._backend_key != key:
            self._backend, self._backend_key = get_backend(*key), key
        return self._backend

    def bind(self, x_TD: Tensor, backend: Backend) -> Bound:
        """The routed experts on `backend`, their weights cast like x (autocast): stage 3's math."""
        e = self.experts
        if not e.fused:  # a registered expert kind with math of its own
            return Bound(_PerExpert(e), None, e.activation)
        return Bound(backend, ExpertWeights(e.w1, e.w2, e.b1, e.b2).cast_like(x_TD), e.activation)

    # stage 1 + 2 -----------------------------------------------------------------------
    def route(self, x_TD: Tensor, backend: Backend | None = None) -> tuple[Routing, Plan]:
        """Routing of x_TD [T, D] and its plan; `backend` may fuse the selection and the sort."""
        backend = backend if backend is not None else self.backend(x_TD)
        with stage("moe.router"):
            routing = self.router(x_TD, backend.select)
        capacity = self.router.capacity(x_TD.shape[0]) if self.router.uses_capacity else None
        with stage("moe.plan"):
            plan = make_plan(
                routing.experts,
                routing.weights,
                routing.priority,
                self.cfg.n_experts,
                capacity,
                self.cfg.renormalize_after_drop,
                backend,
            )
        return routing, plan

    # stage 3 ---------------------------------------------------------------------------------
    def compute(
        self, x_TD: Tensor, plan: Plan, backend: Backend | None = None
    ) -> tuple[Tensor, Tensor | None, Plan, dict[str, Tensor]]:
        """dispatch -> experts -> combine: (y_TD, shared experts' output or None, the plan as
        used, extra metrics). The shared experts run while the dispatcher moves the rows."""
        x_in = x_TD.to(expert_dtype(x_TD))  # the one cast of the forward (autocast only)
        experts = self.bind(x_in, backend if backend is not None else self.backend(x_TD))
        overlap = None if self.shared is None else partial(self.shared, x_TD)
        threshold = self.cfg.dedup_threshold
        if threshold is None or self.training:
            y_TD, shared_TD = self.dispatcher.combined(x_in, plan, experts, overlap)
            return y_TD, shared_TD, plan, {}
        # librarian merging (inference only) needs every slot's own output
        out_ND, shared_TD = self.dispatcher.slots(x_in, plan, experts, overlap)
        y_TD, plan, fired = deduplicate(out_ND, plan, threshold, x_TD.shape[0])
        return y_TD, shared_TD, plan, {"dedup_fraction": fired}

    # stage 4 ---------------------------------------------------------------------------------
    def finish(self, x_TD: Tensor, y_TD: Tensor, shared_TD: Tensor | None, plan: Plan) -> Tensor:
        """Add the shared experts' output, and the dense FFN for tokens that lost every expert."""
        if shared_TD is not None:
            y_TD = y_TD + shared_TD
        if self.fallback is not None:
            lost_T1 = ~plan.kept_TK.any(-1, keepdim=True)
            y_TD = torch.where(lost_T1, y_TD + self.fallback_output(x_TD), y_TD)
        return y_TD

    def fallback_output(self, x_TD: Tensor) -> Tensor:
        """The dense fallback's output scaled by MoEConfig.fallback_weight (1: as computed)."""
        weight = self.cfg.fallback_weight
        y_TD = self.fallback(x_TD)
        return y_TD if weight == 1.0 else y_TD * weight

    def stages(self, x_TD: Tensor) -> tuple[Tensor, Routing, Plan, dict[str, Tensor]]:
        """The forward on x_TD [T, D], one line: (y_TD, routing, plan as used, extra metrics)."""
        backend = self.backend(x_TD)
        routing, plan = self.route(x_TD, backend)
        if self.cfg.track_coactivation:
            self.count_coactivation(routing.experts)
        with stage("moe.experts"):
            y_TD, shared_TD, plan, extra = self.compute(x_TD, plan, backend)
        with stage("moe.finish"):
            y_TD = self.finish(x_TD, y_TD, shared_TD, plan)
        return y_TD, routing, plan, extra

    def forward(self, x: Tensor) -> tuple[Tensor, MoEInfo]:
        check_input(x, self.cfg.d_model)
        if self.cfg.debug:
            _sync_check_finite(x)
        lead = tuple(x.shape[:-1])
        x_TD = x.reshape(-1, self.cfg.d_model)
        if self.replay is not None and not self.training and self.replay.usable(x_TD):
            out = self.replay(x_TD)  # small inference batch: a CUDA-graph replay
            if out is not None:
                y_TD, kept_TK, weights_TK, *parts = out
                info = MoEInfo(Routing(*parts), kept_TK, weights_TK, self.cfg.router, lead)
                return y_TD.reshape(*lead, self.cfg.d_model), info
        y_TD, routing, plan, extra = self.stages(x_TD)
        info = MoEInfo(
            routing, plan.kept_TK, plan.weights_TK, self.cfg.router, lead, extra, plan.capacity
        )
        return y_TD.reshape(*lead, self.cfg.d_model), info

    @torch.no_grad()
    def count_coactivation(self, experts_TK: Tensor) -> None:
        """Add each token's chosen experts (before capacity drops) to `coactivation` [E, E]."""
        self.coactivation.add_(coactivation_counts(experts_TK, self.cfg.n_experts))

    def constellations(self, n: int) -> list[list[int]]:
        """Partition the experts into n clusters of experts often chosen together.

        Usable as `RouterConfig.constellations`; needs `MoEConfig.track_coactivation`.
        """
        if not self.cfg.track_coactivation:
            raise ValueError("constellations need MoEConfig.track_coactivation=True")
        return find_constellations(self.coactivation, n)

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"d_model={c.d_model}, d_hidden={c.d_hidden}, n_experts={c.n_experts}, k={c.k}, "
            f"router={c.router.kind}, capacity_factor={c.capacity_factor}, backend={c.backend}"
            f"{self.dispatcher.extra_repr()}"
        )
