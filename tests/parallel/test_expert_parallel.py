"""ExpertParallelMoE on 2 and 4 gloo ranks against `moekit.MoE` on each rank's tokens.

Oracle: a deep copy of the dense layer run on rank r's tokens gives rank r's output, input
gradient, routing, aux loss and replicated-parameter gradients; the expert gradients are the
sum of those copies' over all ranks (every rank's tokens reach every expert).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from moekit import MoE, MoEConfig, RouterConfig
from moekit.backends import unsupported_reason
from moekit.dispatch import combine
from moekit.parallel import (
    AllToAllDispatcher,
    ExpertParallelMoE,
    gather_experts,
    split_expert_params,
    to_dense,
)

REL_TOL = 1e-6


def _close(got: Tensor | None, want: Tensor | None, what: str) -> None:
    """Relative max-error check; a missing gradient counts as zeros."""
    if got is None and want is None:
        return
    got = torch.zeros_like(want) if got is None else got
    want = torch.zeros_like(got) if want is None else want
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel() == 0:
        return
    scale = float(want.abs().max()) or 1.0
    err = float((got - want).abs().max()) / scale
    assert err < REL_TOL, f"{what}: relative error {err:.3g}"


def _dense_reference(dense: MoE, xs: list[Tensor], gs: list[Tensor]):
    """Per-rank results of the dense layer and the expert gradients summed over ranks."""
    per_rank, expert_grads = [], {}
    for x, g in zip(xs, gs, strict=True):
        m = copy.deepcopy(dense)
        x = x.clone().requires_grad_()
        y, info = m(x)
        ((y * g).sum() + info.aux_loss).backward()
        grads = {}
        for name, p in m.named_parameters():
            if name.startswith("experts."):
                pg = torch.zeros_like(p) if p.grad is None else p.grad
                expert_grads[name] = expert_grads.get(name, 0) + pg
            else:
                grads[name] = p.grad
        per_rank.append({"y": y.detach(), "x_grad": x.grad, "info": info, "grads": grads})
    return per_rank, expert_grads


def _check(cfg: MoEConfig, T_R: list[int], seed: int, group=None, x_scale=1.0):
    """EP forward + backward on this rank equals the dense oracle; returns (info, ref info)."""
    torch.manual_seed(seed)
    dense = MoE(cfg)
    ep = ExpertParallelMoE.from_dense(dense, group)
    g = torch.Generator().manual_seed(seed + 1)
    xs = [x_scale * torch.randn(T, cfg.d_model, generator=g) for T in T_R]
    gs = [torch.randn(T, cfg.d_model, generator=g) for T in T_R]
    ref, expert_grads = _dense_reference(dense, xs, gs)
    me = dist.get_rank(group)
    mine = ref[me]
    x = xs[me].clone().requires_grad_()
    y, info = ep(x)
    ((y * gs[me]).sum() + info.aux_loss).backward()
    _close(y, mine["y"], "y")
    _close(x.grad, mine["x_grad"], "x.grad")
    _close(info.aux_loss, mine["info"].aux_loss, "aux_loss")
    assert torch.equal(info.routing.experts, mine["info"].routing.experts), "kept experts differ"
    for name, p in ep.named_parameters():
        if name.startswith("experts."):
            grad = torch.zeros_like(p) if p.grad is None else p.grad
            _close(gather_experts(grad, group), expert_grads[name], f"{name}.grad")
        else:
            _close(p.grad, mine["grads"][name], f"{name}.grad")
    return info, mine["info"]


CONFIGS = [
    dict(n_experts=4, k=2),
    dict(
        n_experts=8,
        k=2,
        capacity_factor=0.5,
        renormalize_after_drop=True,
        fallback="dense",
        n_shared_experts=1,
        expert=dict(activation="gelu", bias=True),
    ),
    dict(n_experts=8, k=3, capacity_factor=1.0, router=dict(kind="sigmoid", n_groups=2)),
    dict(n_experts=4, k=2, router=dict(kind="expert_choice")),
    dict(n_experts=8, k=2, router=dict(kind="sinkhorn", options={"iters": 5})),
    dict(n_experts=16, k=4, expert=dict(activation="relu")),  # dense torch backend pads
    dict(n_experts=8, k=2, capacity_factor=0.75, d_model=16, d_hidden=12, backend="grouped_mm"),
]


def _sweep(rank: int, world: int) -> None:
    for i, extra in enumerate(CONFIGS):
        cfg = MoEConfig(**{"d_model": 12, "d_hidden": 10, "backend": "torch", **extra})
        if unsupported_reason(cfg.backend, torch.device("cpu"), torch.float32):
            continue  # an older torch without a CPU grouped_mm
        T_R = [
            int(t)
            for t in torch.randint(1, 24, (world,), generator=torch.Generator().manual_seed(i))
        ]
        T_R[i % world] = 1
        try:
            _check(cfg, T_R, seed=100 + i)
        except AssertionError as err:
            raise AssertionError(f"config {extra}, tokens per rank {T_R}: {err}") from err


@pytest.mark.parametrize("world", [2, 4])
def test_outputs_and_gradients_match_the_dense_layer(launch, world):
    launch(_sweep, world)


def _capacity(rank: int, world: int) -> None:
    cfg = MoEConfig(d_model=8, d_hidden=6, n_experts=4, k=2, capacity_factor=0.5, backend="torch")
    info, ref = _check(cfg, [16] * world, seed=7)
    dropped = (info.routing.experts < 0).sum()
    assert dropped > 0, "capacity 0.5 must drop slots, or this test checks nothing"
    assert torch.equal(info.metrics["dropped_fraction"], ref.metrics["dropped_fraction"])


def test_capacity_drops_the_same_slots(launch):
    launch(_capacity, 2)


def _one_rank_gets_everything(rank: int, world: int) -> None:
    cfg = MoEConfig(d_model=8, d_hidden=6, n_experts=4, k=2, backend="torch")
    torch.manual_seed(3)
    dense = MoE(cfg)
    with torch.no_grad():  # positive inputs score far higher on experts 0, 1 (rank 0's)
        dense.router.weight.copy_(torch.tensor([1.0, 0.9, -1.0, -1.0]).unsqueeze(-1).expand(4, 8))
    ep = ExpertParallelMoE.from_dense(dense)
    x = torch.rand(9, 8).add(0.5).requires_grad_()
    y, info = ep(x)
    y.sum().backward()
    assert (info.routing.experts < 2).all(), "routing should use only rank 0's experts"
    y_ref, _ = dense(x.detach())
    _close(y, y_ref, "y")
    w1_grad_E = gather_experts(
        torch.zeros_like(ep.experts.w1) if ep.experts.w1.grad is None else ep.experts.w1.grad
    )
    assert w1_grad_E[:2].abs().sum() > 0 and w1_grad_E[2:].abs().sum() == 0


def test_all_tokens_routed_to_one_rank(launch):
    launch(_one_rank_gets_everything, 2)


def _empty_rank(rank: int, world: int) -> None:
    cfg = MoEConfig(d_model=8, d_hidden=6, n_experts=4, k=2, backend="torch")
    info, _ = _check(cfg, [0, 11, 0, 5][:world], seed=11)
    if rank == 0:
        assert info.routing.experts.shape == (0, 2)


@pytest.mark.parametrize("world", [2, 4])
def test_a_rank_with_zero_tokens(launch, world):
    launch(_empty_rank, world)


def _no_grad_input(rank: int, world: int) -> None:
    """x without requires_grad on one rank only: backward still completes everywhere."""
    cfg = MoEConfig(d_model=8, d_hidden=6, n_experts=4, k=2, backend="torch")
    torch.manual_seed(5)
    ep = ExpertParallelMoE(cfg)
    x = torch.randn(6, 8, requires_grad=rank == 1)
    y, _ = ep(x)
    y.square().sum().backward()
    assert ep.experts.w1.grad is not None and ep.experts.w1.grad.abs().sum() > 0
    assert (x.grad is not None) == (rank == 1)


def test_backward_when_only_some_ranks_need_input_gradients(launch):
    launch(_no_grad_input, 2)


def _bad_group(rank: int, world: int) -> None:
    cfg = MoEConfig(d_model=8, d_hidden=6, n_experts=6, k=2)
    with pytest.raises(ValueError, match=r"n_experts=6 .* group size 4"):
        ExpertParallelMoE(cfg)


def test_experts_not_divisible_by_group_size(launch):
    launch(_bad_group, 4)


def _swapped_dispatcher(rank: int, world: int) -> None:
    """The expert-parallel layer is a plain MoE with the all-to-all dispatcher swapped in."""
    cfg = MoEConfig(d_model=8, d_hidden=6, n_experts=4, k=2, backend="torch")
    ep, dense = ExpertParallelMoE(cfg), MoE(cfg)
    assert type(ep) is MoE and isinstance(ep.dispatcher, AllToAllDispatcher)
    assert isinstance(ep, ExpertParallelMoE) and not isinstance(dense, ExpertParallelMoE)
    assert ep.dispatcher.first_expert == rank * 2 and ep.replay is None
    assert "ep_size=2, local_experts=2" in repr(ep)


def test_expert_parallel_layer_is_an_moe_with_another_dispatcher(launch):
    launch(_swapped_dispatcher, 2)


def _subgroups(rank: int, world: int) -> None:
    """EP=2 inside a 4-rank world (two replicas): same layer as EP=4 and as the dense one."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = groups[rank // 2]
    cfg = MoEConfig(d_model=8, d_hidden=6, n_experts=4, k=2, backend="torch")
    _check(cfg, [7, 3, 5, 9][rank // 2 * 2 : rank // 2 * 2 + 2], seed=21, group=group)
    torch.manual_seed(0)  # direct construction: the shard of what MoE(cfg) makes, any size
    ep2 = ExpertParallelMoE(cfg, group)
    torch.manual_seed(0)
    ep4 = ExpertParallelMoE(cfg)
    torch.manual_seed(0)
    dense = MoE(cfg)
    assert ep2.dispatcher.n_local == 2 and ep4.dispatcher.n_local == 1
    for ep in (ep2, ep4):
        state = to_dense(ep).state_dict()
        for name, value in dense.state_dict().items():
            assert torch.equal(state[name], value), name


def test_expert_parallel_subgroups(launch):
    launch(_subgroups, 4)


def _conversions(rank: int, world: int) -> None:
    cfg = MoEConfig(d_model=8, d_hidden=6, n_experts=4, k=2, n_shared_experts=1)
    torch.manual_seed(1)
    dense = MoE(cfg)
    ep = ExpertParallelMoE.from_dense(dense)
    assert torch.equal(ep.experts.w2, dense.experts.w2[2 * rank : 2 * rank + 2])
    back = to_dense(ep)
    for (name, a), b in zip(back.state_dict().items(), dense.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    dense_names = {n for n, _ in dense.named_parameters()}
    assert {n for n, _ in ep.named_parameters()} == dense_names, "EP must hold MoE's parameters"
    expert, other = split_expert_params(ep)
    assert {id(p) for p in expert} == {id(p) for p in ep.experts.parameters()}
    assert all(p._moekit_expert_parallel for p in expert) and len(other) == 1 + 2
    ep.experts.w1.data.add_(1.0)
    assert not torch.equal(ep.experts.w1, dense.experts.w1[2 * rank : 2 * rank + 2]), "a copy"
    half = ExpertParallelMoE.from_dense(dense.to(torch.bfloat16))
    assert half.experts.w1.dtype == half.router.weight.dtype == torch.bfloat16
    y, _ = half(torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_from_dense_and_to_dense_round_trip(launch):
    launch(_conversions, 2)


def _inference_options(rank: int, world: int) -> None:
    """Options that go through MoE.forward: co-activation counts, librarian dedup at eval."""
    cfg = MoEConfig(
        d_model=8, d_hidden=6, n_experts=4, k=3, backend="torch", track_coactivation=True,
        dedup_threshold=1e-3,  # merges most slots: a visible change
    )  # fmt: skip
    torch.manual_seed(8)
    dense = MoE(cfg).eval()
    ep = ExpertParallelMoE.from_dense(dense)
    x = torch.randn(7, 8, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        y, info = ep(x)
        y_ref, info_ref = dense(x)
    _close(y, y_ref, "y")
    assert info.metrics["dedup_fraction"] > 0
    _close(info.metrics["dedup_fraction"], info_ref.metrics["dedup_fraction"], "dedup_fraction")
    assert torch.equal(ep.coactivation, dense.coactivation) and ep.coactivation.sum() > 0


def test_coactivation_and_dedup_work_through_the_exchange(launch):
    launch(_inference_options, 2)


def _sigmoid_bias(rank: int, world: int) -> None:
    """Each rank routes its own tokens; the balance bias moves by the load of all of them."""
    cfg = MoEConfig(
        d_model=8, d_hidden=6, n_experts=4, k=2, backend="torch",
        router=RouterConfig(kind="sigmoid", options={"bias_update_rate": 0.1}),
    )  # fmt: skip
    torch.manual_seed(3)
    dense = MoE(cfg).train()
    ep = ExpertParallelMoE.from_dense(dense)
    g = torch.Generator().manual_seed(4)
    moved = False
    for step in range(3):
        xs = [torch.randn(5 + 4 * r, 8, generator=g) for r in range(world)]
        with torch.no_grad():
            ep(xs[rank])
            dense(torch.cat(xs))  # one process seeing every rank's tokens
        ep.router.before_optimizer_step()  # the training step's hook: sums the ranks' load
        dense.router.before_optimizer_step()
        bias = ep.router.expert_bias
        moved |= bool(bias.abs().sum() > 0)
        assert torch.equal(bias, dense.router.expert_bias), f"step {step}: bias != dense"
        every = [torch.empty_like(bias) for _ in range(world)]
        dist.all_gather(every, bias)
        assert all(torch.equal(b, bias) for b in every), f"step {step}: ranks disagree"
    assert moved, "the bias never moved"


def test_sigmoid_bias_is_the_same_on_every_rank(launch):
    launch(_sigmoid_bias, 2)


def _overlap(rank: int, world: int) -> None:
    """The shared experts run during the dispatch; output and gradients are those of the
    schedule without overlap (slots, combine, then `MoE.finish`), bit for bit."""
    cfg = MoEConfig(
        d_model=8, d_hidden=6, n_experts=4, k=2, n_shared_experts=1, capacity_factor=0.5,
        fallback="dense", backend="torch",
    )  # fmt: skip
    torch.manual_seed(6)
    ep = ExpertParallelMoE.from_dense(MoE(cfg))
    x = torch.randn(7 + 3 * rank, 8, generator=torch.Generator().manual_seed(rank))
    runs = []
    for overlap in (True, False):
        ep.zero_grad(set_to_none=True)
        x_TD = x.clone().requires_grad_()
        if overlap:
            y_TD, _ = ep(x_TD)
        else:
            _, plan = ep.route(x_TD)
            experts = ep.bind(x_TD, ep.backend(x_TD))
            out_ND, _ = ep.dispatcher.slots(x_TD, plan, experts)
            y_TD = combine(out_ND, plan.token_S, plan.weight_S, x_TD.shape[0])
            y_TD = ep.finish(x_TD, y_TD, ep.shared(x_TD), plan)
        y_TD.square().sum().backward()
        runs.append([y_TD, x_TD.grad] + [p.grad for p in ep.parameters()])
    for i, (a, b) in enumerate(zip(*runs, strict=True)):
        assert (a is None and b is None) or torch.equal(a, b), f"tensor {i} differs"


def test_shared_experts_overlap_the_dispatch_without_changing_results(launch):
    launch(_overlap, 2)
