"""`MoE`: the Mixture-of-Experts layer, four stages: route -> plan -> compute -> finish."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import fields, replace

import torch
from torch import Tensor, nn

from moekit.backends import check_backend, get_backend
from moekit.config import MoEConfig, RouterConfig
from moekit.dispatch import Plan, combine, gather, make_plan
from moekit.experts import DenseMLP, GatedDenseMLP, build_experts
from moekit.librarian import deduplicated_compute
from moekit.ranges import stage
from moekit.replay import GraphReplay
from moekit.routing import Routing, build_router
from moekit.routing.coactivation import coactivation_counts, find_constellations
from moekit.routing.losses import router_losses, routing_metrics, weighted_aux_loss


class MoEInfo:
    """What a forward pass reports besides y, each part computed when first read.

    aux_loss: scalar, already weighted by the router config. metrics: tensors (expert_load [E],
    dropped_fraction, router_entropy, router_z, unweighted loss parts...). routing: experts
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
    ) -> None:
        self._routed = routed  # as the router chose, before capacity drops
        self._kept_TK = kept_TK
        self._weights_TK = weights_TK
        self._router = router
        self._lead = lead
        self._extra = extra or {}
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


def autocast_input(x: Tensor) -> Tensor:
    """float32 x in the autocast dtype when autocast is on for its device, else x as it is.

    The expert GEMMs then run in bf16 / fp16 under autocast as an nn.Linear's would; backends
    are custom ops that autocast does not reach.
    """
    device_type = x.device.type
    if device_type not in ("cuda", "cpu") or x.dtype != torch.float32:
        return x
    if torch.is_autocast_enabled(device_type):
        return x.to(torch.get_autocast_dtype(device_type))
    return x


def autocast_weights(x_TD: Tensor, *weights: Tensor | None) -> tuple[Tensor | None, ...]:
    """Expert weights in x's dtype when autocast lowered x (fp32 master weights, bf16 GEMMs).

    Autocast does not reach the backends' custom ops, so without this the Triton kernels would
    stage fp32 weight tiles (twice the shared memory and bytes of bf16 ones). The cast is
    differentiable: gradients still reach the fp32 parameters, as with autocast's nn.Linear.
    """
    device_type = x_TD.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return weights
    return tuple(
        w.to(x_TD.dtype) if w is not None and w.dtype != x_TD.dtype else w for w in weights
    )


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
        routing, plan = self.route(x_TD)
        y_TD = self.finish(x_TD, self.compute(x_TD, plan), plan)
        parts = tuple(getattr(routing, f.name) for f in fields(Routing))
        return (y_TD, plan.kept_TK, plan.weights_TK, *parts)

    # stage 1 + 2 -----------------------------------------------------------------------
    def route(self, x_TD: Tensor) -> tuple[Routing, Plan]:
        with stage("moe.router"):
            routing = self.router(x_TD)
        capacity = self.router.capacity(x_TD.shape[0]) if self.router.uses_capacity else None
        with stage("moe.plan"):
            plan = make_plan(
                routing.experts,
                routing.weights,
                routing.priority,
                self.cfg.n_experts,
                capacity,
                self.cfg.renormalize_after_drop,
            )
        return routing, plan

    # stage 3 ---------------------------------------------------------------------------------
    def compute(self, x_TD: Tensor, plan: Plan) -> Tensor:
        x_TD = autocast_input(x_TD)
        e = self.experts
        if not e.fused:  # a registered expert kind with math of its own
            return combine(self.compute_slots(x_TD, plan), plan.token_S, plan.weight_S, len(x_TD))
        experts_forward = get_backend(self.cfg.backend, x_TD.device, x_TD.dtype)
        w1, w2, b1, b2 = autocast_weights(x_TD, e.w1, e.w2, e.b1, e.b2)
        return experts_forward(x_TD, plan, w1, w2, b1, b2, e.activation)

    def compute_slots(self, x_TD: Tensor, plan: Plan) -> Tensor:
        """Stage 3 without the combine: unweighted outputs of the kept sorted slots [N, D]."""
        e = self.experts
        x_SD = gather(x_TD, plan.token_S)
        if not e.fused:
            return e.per_slot(x_SD, plan.offsets_E1)
        experts_per_slot = get_backend(self.cfg.backend, x_TD.device, x_TD.dtype, per_slot=True)
        w1, w2, b1, b2 = autocast_weights(x_TD, e.w1, e.w2, e.b1, e.b2)
        return experts_per_slot(x_SD, plan.offsets_E1, w1, w2, b1, b2, e.activation)

    # stage 4 ---------------------------------------------------------------------------------
    def finish(self, x_TD: Tensor, y_TD: Tensor, plan: Plan) -> Tensor:
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        if self.fallback is not None:  # tokens that lost every expert get the dense FFN
            lost_T1 = ~plan.kept_TK.any(-1, keepdim=True)
            y_TD = torch.where(lost_T1, y_TD + self.fallback(x_TD), y_TD)
        return y_TD

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
        routing, plan = self.route(x_TD)
        if self.cfg.track_coactivation:
            self.count_coactivation(routing.experts)
        threshold = self.cfg.dedup_threshold
        with stage("moe.experts"):
            if threshold is not None and not self.training:  # librarian merging, inference only
                y_TD, plan, fired = deduplicated_compute(x_TD, plan, self.compute_slots, threshold)
            else:
                y_TD, fired = self.compute(x_TD, plan), None
        with stage("moe.finish"):
            y_TD = self.finish(x_TD, y_TD, plan)
        extra = {} if fired is None else {"dedup_fraction": fired}
        info = MoEInfo(routing, plan.kept_TK, plan.weights_TK, self.cfg.router, lead, extra)
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
        )
