"""Expert parallelism: the MoE layer with its experts split over the ranks of a process group.

Each rank routes its own tokens with a replicated router and makes the same `Plan` the
single-process layer makes, so the layer on rank r computes exactly `moekit.MoE` applied to
rank r's tokens. Only the dispatcher differs (`AllToAllDispatcher`, swapped into a plain
`MoE` by `shard`): kept token-slots travel to the rank owning their expert (all-to-all), run
through the backend's per-slot half grouped by local expert, travel back, and
`dispatch.combine` sums them per token as in the single-process layer.

Shape legend: T tokens on this rank, S = T * K token-slots, N kept slots this rank sends,
M slots it receives, R ranks in the group, L = E / R experts per rank, D model dim.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from moekit.config import MoEConfig
from moekit.dispatch import Dispatcher, Overlap, Rows, SlotExperts, gather
from moekit.layer import MoE
from moekit.parallel.comm import _sync_split_sizes, all_to_all, all_to_all_start
from moekit.types import Plan

EXPERT_PARALLEL_ATTR = "_moekit_expert_parallel"  # set True on every sharded expert parameter


def _group_size_and_rank(group: ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ExpertParallelMoE needs torch.distributed.init_process_group first")
    return dist.get_world_size(group), dist.get_rank(group)


class AllToAllDispatcher(Dispatcher):
    """Stage 3's rows over `group`: kept slots travel to the rank owning their expert, run
    through the backend's per-slot half there, travel back, and `dispatch.combine` sums them.

    Each rank holds L = E / R experts, global indices [first_expert, first_expert + L).
    """

    def __init__(self, group: ProcessGroup | None, ep_size: int, ep_rank: int, n_local: int):
        self.group, self.ep_size, self.ep_rank, self.n_local = group, ep_size, ep_rank, n_local

    @property
    def first_expert(self) -> int:
        return self.ep_rank * self.n_local

    def slots(self, x_TD: Tensor, plan: Plan, run: SlotExperts, overlap: Overlap = None) -> Rows:
        """(slot outputs [N, D], overlap() or None): `overlap` runs while the rows are away."""
        counts_RL = plan.counts_E.view(self.ep_size, self.n_local)
        send_R, recv_R, recv_counts_RL = _sync_split_sizes(counts_RL, self.group)
        # kept slots come first, sorted by expert, so by rank
        x_ND = gather(x_TD, plan.token_S[: sum(send_R)])
        if torch.is_grad_enabled() and not x_ND.requires_grad:
            # every rank must run the backward exchange, even where x needs no gradient
            x_ND = x_ND.detach().requires_grad_()
        x_MD, work = all_to_all_start(x_ND, send_R, recv_R, self.group)
        overlap_TD = overlap() if overlap is not None else None
        work.wait()
        out_MD = self._local_experts(x_MD, recv_counts_RL, run)
        if x_MD.shape[0] == 0:  # backends return a constant here; keep the graph through x_MD
            out_MD = out_MD + x_MD
        return all_to_all(out_MD, recv_R, send_R, self.group), overlap_TD

    def _local_experts(self, x_MD: Tensor, recv_counts_RL: Tensor, run: SlotExperts) -> Tensor:
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
        x_SD = gather(x_MD, order_M)  # every received row is kept: S = M
        out_SD = run.per_slot(x_SD, offsets_L1)
        return torch.zeros_like(out_SD).index_copy(0, order_M, out_SD)

    def extra_repr(self) -> str:
        return f", ep_size={self.ep_size}, local_experts={self.n_local}"


def shard(moe: MoE, group: ProcessGroup | None = None) -> MoE:
    """Make `moe` (in place) this rank's expert-parallel shard: its experts cut to this rank's
    slice and the all-to-all dispatcher swapped in. Router, shared experts and fallback stay
    replicated; with the same weights on every rank it computes `MoE` on each rank's tokens."""
    R, rank = _group_size_and_rank(group)
    E = moe.cfg.n_experts
    if E % R:
        raise ValueError(f"n_experts={E} must be divisible by the expert-parallel group size {R}")
    dispatcher = AllToAllDispatcher(group, R, rank, E // R)
    lo, hi = dispatcher.first_expert, dispatcher.first_expert + dispatcher.n_local
    for name, p in list(moe.experts.named_parameters()):  # copies: the full ones are freed
        setattr(moe.experts, name, nn.Parameter(p.detach()[lo:hi].clone()))
    moe.dispatcher = dispatcher
    _mark_expert_params(moe)
    moe.replay = None  # collectives run by every rank at once: no per-rank graph replay
    share_router_load(moe, group)  # the same tokens decide the balance bias on every rank
    return moe


def is_expert_parallel(module: nn.Module) -> bool:
    """Whether `module` is an MoE whose experts are split over a process group."""
    return isinstance(module, MoE) and isinstance(module.dispatcher, AllToAllDispatcher)


class _ShardedLayer(type):
    def __instancecheck__(cls, obj: object) -> bool:
        return isinstance(obj, nn.Module) and is_expert_parallel(obj)


class ExpertParallelMoE(metaclass=_ShardedLayer):
    """`ExpertParallelMoE(cfg, group)`: an `MoE` with E experts split evenly over `group`.

    Not a subclass: the result is a plain `moekit.MoE` built as `MoE(cfg)` and then `shard`ed,
    so with the same RNG seed on every rank it is the shard of the very layer `MoE(cfg)` makes
    (at the cost of drawing all E experts once). `isinstance(m, ExpertParallelMoE)` tells such
    layers apart.
    """

    def __new__(cls, cfg: MoEConfig, group: ProcessGroup | None = None) -> MoE:  # type: ignore[misc]
        _group_size_and_rank(group)
        return shard(MoE(cfg), group)

    @staticmethod
    def from_dense(moe: MoE, group: ProcessGroup | None = None) -> MoE:
        """This rank's shard of a single-process MoE (same weights on every rank expected).

        Copies, on the dense layer's devices and dtypes; the dense layer is left unchanged.
        """
        with torch.random.fork_rng(devices=[]):  # a throwaway initialisation: leave the RNG
            ep = ExpertParallelMoE(moe.cfg, group)
        local = local_slice(ep, moe.state_dict())
        ep.load_state_dict({k: v.clone() for k, v in local.items()}, assign=True)
        _mark_expert_params(ep)  # assign=True made new Parameter objects
        return ep.train(moe.training)


def local_slice(layer: MoE, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A single-process MoE state dict cut to this shard's experts."""
    lo = layer.dispatcher.first_expert
    hi = lo + layer.dispatcher.n_local
    return {k: v[lo:hi] if k.startswith("experts.") else v for k, v in state_dict.items()}


def _mark_expert_params(layer: MoE) -> None:
    for p in layer.experts.parameters():
        setattr(p, EXPERT_PARALLEL_ATTR, True)


def load_dense_state_dict(layer: MoE, state_dict: dict[str, Tensor], strict: bool = True):
    """Load a single-process MoE state dict, keeping this rank's slice of each expert tensor."""
    return layer.load_state_dict(local_slice(layer, state_dict), strict=strict)


def dense_state_dict(layer: MoE) -> dict[str, Tensor]:
    """The single-process MoE state dict, expert tensors gathered. Every rank must call it."""
    state = layer.state_dict()
    for name, p in layer.experts.named_parameters():
        state[f"experts.{name}"] = gather_experts(p.detach(), layer.dispatcher.group)
    return state


def to_dense(layer: MoE) -> MoE:
    """A single-process `moekit.MoE` with all experts (copies). Every rank must call it."""
    local = {f"experts.{n}" for n, _ in layer.experts.named_parameters()}
    state = {k: v if k in local else v.clone() for k, v in dense_state_dict(layer).items()}
    with torch.random.fork_rng(devices=[]):
        moe = MoE(layer.cfg)
    moe.load_state_dict(state, assign=True)
    return moe.train(layer.training)


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
        id(p) for m in module.modules() if is_expert_parallel(m) for p in m.experts.parameters()
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
        if is_expert_parallel(child):
            continue
        if isinstance(child, MoE):
            setattr(model, name, ExpertParallelMoE.from_dense(child, group))
        else:
            parallelize_experts(child, group)
    return model
