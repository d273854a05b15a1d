"""`ExpertParallelMoE`: the MoE layer with its experts split over the ranks of a process group.

Each rank routes its own tokens with a replicated router and makes the same `Plan` the
single-process layer makes, so the layer on rank r computes exactly `moekit.MoE` applied to
rank r's tokens. Only stage 3 differs: kept token-slots travel to the rank owning their expert
(all-to-all), run through the backend's per-slot half grouped by local expert, travel back, and
`dispatch.combine` sums them per token as in the single-process layer.

Shape legend: T tokens on this rank, S = T * K token-slots, N kept slots this rank sends,
M slots it receives, R ranks in the group, L = E / R experts per rank, D model dim.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from moekit.backends import get_backend
from moekit.config import MoEConfig
from moekit.dispatch import Plan, combine, gather
from moekit.layer import MoE, autocast_input
from moekit.parallel.comm import _sync_split_sizes, all_to_all, all_to_all_start

EXPERT_PARALLEL_ATTR = "_moekit_expert_parallel"  # set True on every sharded expert parameter


def _group_size_and_rank(group: ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ExpertParallelMoE needs torch.distributed.init_process_group first")
    return dist.get_world_size(group), dist.get_rank(group)


class ExpertParallelMoE(MoE):
    """MoE with E experts split evenly over `group`: x [..., D] -> (y [..., D], MoEInfo).

    Router, shared experts and dense fallback are replicated; `experts` holds this rank's
    L = E / R experts, global indices [first_expert, first_expert + L). Built as `MoE(cfg)`
    and then cut down, so with the same RNG seed on every rank it is the shard of the very
    layer `MoE(cfg)` makes (at the cost of drawing all E experts once). route / finish / info
    are inherited from MoE; `compute` exchanges the kept token-slots.
    """

    def __init__(self, cfg: MoEConfig, group: ProcessGroup | None = None) -> None:
        R, rank = _group_size_and_rank(group)
        if cfg.n_experts % R:
            raise ValueError(
                f"n_experts={cfg.n_experts} must be divisible by the expert-parallel group size {R}"
            )
        super().__init__(cfg)
        self.group, self.ep_size, self.ep_rank = group, R, rank
        self.n_local = cfg.n_experts // R
        self.first_expert = rank * self.n_local
        lo, hi = self.first_expert, self.first_expert + self.n_local
        for name, p in list(self.experts.named_parameters()):  # copies: the full ones are freed
            setattr(self.experts, name, nn.Parameter(p.detach()[lo:hi].clone()))
        self._mark_expert_params()
        self.replay = None  # collectives run by every rank at once: no per-rank graph replay
        share_router_load(self, group)  # the same tokens decide the balance bias on every rank

    # stage 3 ---------------------------------------------------------------------------------
    def compute(self, x_TD: Tensor, plan: Plan) -> Tensor:
        """Send kept slots to their expert's rank, run local experts, combine the answers.

        The shared experts run while the tokens are in flight and are added here (as `finish`
        would add them), so the sum is the single-process layer's, bit for bit.
        """
        shared = self.shared
        side = None if shared is None else (lambda: shared(x_TD))
        out_ND, shared_TD = self._exchange_slots(autocast_input(x_TD), plan, side)
        y_TD = combine(out_ND, plan.token_S, plan.weight_S, x_TD.shape[0])
        return y_TD if shared_TD is None else y_TD + shared_TD

    def compute_slots(self, x_TD: Tensor, plan: Plan) -> Tensor:
        """Unweighted outputs [N, D] of this rank's N kept sorted slots, each computed on the
        rank that owns its expert."""
        return self._exchange_slots(x_TD, plan, None)[0]

    def _exchange_slots(
        self, x_TD: Tensor, plan: Plan, side: Callable[[], Tensor] | None
    ) -> tuple[Tensor, Tensor | None]:
        """(slot outputs [N, D], side() or None): `side` runs while the dispatch is in flight."""
        counts_RL = plan.counts_E.view(self.ep_size, self.n_local)
        send_R, recv_R, recv_counts_RL = _sync_split_sizes(counts_RL, self.group)
        # kept slots come first, sorted by expert, so by rank
        x_ND = gather(x_TD, plan.token_S[: sum(send_R)])
        if torch.is_grad_enabled() and not x_ND.requires_grad:
            # every rank must run the backward exchange, even where x needs no gradient
            x_ND = x_ND.detach().requires_grad_()
        x_MD, work = all_to_all_start(x_ND, send_R, recv_R, self.group)
        side_TD = side() if side is not None else None
        work.wait()
        out_MD = self._local_experts(x_MD, recv_counts_RL)
        if x_MD.shape[0] == 0:  # backends return a constant here; keep the graph through x_MD
            out_MD = out_MD + x_MD
        return all_to_all(out_MD, recv_R, send_R, self.group), side_TD

    # stage 4 ---------------------------------------------------------------------------------
    def finish(self, x_TD: Tensor, y_TD: Tensor, plan: Plan) -> Tensor:
        """`MoE.finish`, less the shared experts where `compute` already added them."""
        librarian = self.cfg.dedup_threshold is not None and not self.training  # as in forward
        if self.shared is not None and librarian:  # compute_slots ran: no shared output yet
            y_TD = y_TD + self.shared(x_TD)
        if self.fallback is not None:  # tokens that lost every expert get the dense FFN
            lost_T1 = ~plan.kept_TK.any(-1, keepdim=True)
            y_TD = torch.where(lost_T1, y_TD + self.fallback(x_TD), y_TD)
        return y_TD

    def _local_experts(self, x_MD: Tensor, recv_counts_RL: Tensor) -> Tensor:
        """Unweighted expert outputs for received rows, in received order.

        Rows arrive grouped by source rank, then by local expert: a stable sort by local expert
        groups them for the backend's per-slot half, and the outputs go back to received order.
        """
        M, L = x_MD.shape[0], self.n_local
        local_ids_RL = torch.arange(L, device=x_MD.device).repeat(self.ep_size)
        expert_M = torch.repeat_interleave(local_ids_RL, recv_counts_RL.reshape(-1), output_size=M)
        order_M = torch.argsort(expert_M, stable=True)
        counts_L = recv_counts_RL.sum(0)
        offsets_L1 = torch.cat([counts_L.new_zeros(1), torch.cumsum(counts_L, 0)])
        experts_per_slot = get_backend(self.cfg.backend, x_MD.device, x_MD.dtype, per_slot=True)
        e = self.experts
        x_SD = gather(x_MD, order_M)  # every received row is kept: S = M
        out_SD = experts_per_slot(x_SD, offsets_L1, e.w1, e.w2, e.b1, e.b2, e.activation)
        return torch.zeros_like(out_SD).index_copy(0, order_M, out_SD)

    # conversion --------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, moe: MoE, group: ProcessGroup | None = None) -> ExpertParallelMoE:
        """This rank's shard of a single-process MoE (same weights on every rank expected).

        Copies, on the dense layer's devices and dtypes; the dense layer is left unchanged.
        """
        with torch.random.fork_rng(devices=[]):  # a throwaway initialisation: leave the RNG
            ep = cls(moe.cfg, group)
        local = ep._local_slice(moe.state_dict())
        ep.load_state_dict({k: v.clone() for k, v in local.items()}, assign=True)
        ep._mark_expert_params()  # assign=True made new Parameter objects
        return ep.train(moe.training)

    def _local_slice(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        lo, hi = self.first_expert, self.first_expert + self.n_local
        return {k: v[lo:hi] if k.startswith("experts.") else v for k, v in state_dict.items()}

    def _mark_expert_params(self) -> None:
        for p in self.experts.parameters():
            setattr(p, EXPERT_PARALLEL_ATTR, True)

    def load_dense_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True):
        """Load a single-process MoE state dict, keeping this rank's slice of each expert tensor."""
        return self.load_state_dict(self._local_slice(state_dict), strict=strict)

    def dense_state_dict(self) -> dict[str, Tensor]:
        """The single-process MoE state dict, expert tensors gathered. Every rank must call it."""
        state = self.state_dict()
        for name, p in self.experts.named_parameters():
            state[f"experts.{name}"] = gather_experts(p.detach(), self.group)
        return state

    def to_dense(self) -> MoE:
        """A single-process `moekit.MoE` with all experts (copies). Every rank must call it."""
        local = {f"experts.{n}" for n, _ in self.experts.named_parameters()}
        state = {k: v if k in local else v.clone() for k, v in self.dense_state_dict().items()}
        with torch.random.fork_rng(devices=[]):
            moe = MoE(self.cfg)
        moe.load_state_dict(state, assign=True)
        return moe.train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ep_size={self.ep_size}, local_experts={self.n_local}"


def gather_experts(local_LX: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """[L, ...] per rank -> [E, ...] in global expert order on every rank (collective)."""
    R = dist.get_world_size(group)
    parts = [torch.empty_like(local_LX) for _ in range(R)]
    dist.all_gather(parts, local_LX.contiguous(), group=group)
    return torch.cat(parts)


def _sum_over(load_E: Tensor, group: ProcessGroup | None) -> Tensor:
    dist.all_reduce(load_E, group=group)
    return load_E


def share_router_load(model: nn.Module, group: ProcessGroup | None = None) -> nn.Module:
    """Sum the expert-load counts behind each router's balance bias over `group` (in place).

    DeepSeek-V3's aux-loss-free bias moves with the load each router sees; summed over every
    rank holding a replica of the router, the bias stays identical on all of them. Routers
    offer this through a `load_reduce` hook (the sigmoid router does).
    """
    for m in model.modules():
        if hasattr(m, "load_reduce"):
            m.load_reduce = partial(_sum_over, group=group)
    return model


def split_expert_params(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(expert-parallel params, all others): e.g. FSDP2's `ignored_params`, or two optimizers."""
    expert_ids = {
        id(p)
        for m in module.modules()
        if isinstance(m, ExpertParallelMoE)
        for p in m.experts.parameters()
    }
    expert, other = [], []
    for p in module.parameters():
        (expert if id(p) in expert_ids else other).append(p)
    return expert, other


def parallelize_experts(model: nn.Module, group: ProcessGroup | None = None) -> nn.Module:
    """Replace every `moekit.MoE` inside `model` (in place) by its expert-parallel shard."""
    if isinstance(model, MoE):
        raise TypeError(
            "parallelize_experts replaces MoE layers inside a model; for one layer use "
            "ExpertParallelMoE.from_dense"
        )
    for name, child in list(model.named_children()):
        if isinstance(child, ExpertParallelMoE):
            continue
        if isinstance(child, MoE):
            setattr(model, name, ExpertParallelMoE.from_dense(child, group))
        else:
            parallelize_experts(child, group)
    return model
