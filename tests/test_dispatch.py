"""Property tests of the Plan: every kept slot once, grouped by expert, capacity exact."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tests.oracle import forward_backward, make_moe

import moekit
from moekit.dispatch import Dispatcher, LocalDispatcher, combine, gather, make_plan


@st.composite
def routings(draw):
    E = draw(st.integers(1, 64))
    k = draw(st.integers(1, min(E, 8)))
    T = draw(st.sampled_from([0, 1, draw(st.integers(2, 200))]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    experts = torch.rand(T, E, generator=g).argsort(-1)[:, :k]  # k distinct experts per token
    one_expert = draw(st.booleans())
    if one_expert and T:
        experts[:, 0] = 0  # every token's first choice is expert 0
    priority = torch.rand(T, k, generator=g)
    cf = draw(st.sampled_from([None, 0.25, 0.5, 1.0, 2.0]))
    return T, E, k, experts, priority, cf


@given(routings())
def test_plan_invariants(r):
    T, E, k, experts, priority, cf = r
    C = None if cf is None else math.ceil(cf * T * k / E)
    plan = make_plan(experts, priority, priority, E, C)
    n = int(plan.offsets_E1[-1])
    want = torch.bincount(experts.reshape(-1), minlength=E)
    if C is not None:
        want = want.clamp_max(C)
    assert torch.equal(plan.counts_E, want)
    assert torch.equal(plan.offsets_E1[1:] - plan.offsets_E1[:-1], plan.counts_E)
    # every slot exactly once; kept slots grouped by expert in order, dropped ones at the end
    assert torch.equal(plan.order_S.sort().values, torch.arange(T * k))
    assert torch.equal(plan.expert_S[:n], torch.repeat_interleave(torch.arange(E), plan.counts_E))
    assert bool((plan.expert_S[n:] == E).all())
    flat = experts.reshape(-1)
    assert torch.equal(flat[plan.order_S[:n]], plan.expert_S[:n])
    assert torch.equal(plan.token_S, plan.order_S // k)
    assert int(plan.kept_TK.sum()) == n
    # dropped fraction is exactly the overflow
    overflow = sum(max(0, c - C) for c in torch.bincount(flat, minlength=E).tolist()) if C else 0
    assert T * k - n == overflow
    # drops are by priority: every kept slot of an expert beats every dropped slot of it
    for e in range(E):
        mine = flat == e
        kept, dropped = (
            priority.reshape(-1)[mine & plan.kept_TK.reshape(-1)],
            priority.reshape(-1)[mine & ~plan.kept_TK.reshape(-1)],
        )
        if kept.numel() and dropped.numel():
            assert kept.min() >= dropped.max()


@given(st.integers(2, 40), st.integers(2, 16), st.integers(0, 2**31 - 1))
def test_permuting_tokens_permutes_outputs(T, E, seed):
    torch.manual_seed(seed)
    k = min(2, E)
    cfg = moekit.MoEConfig(d_model=8, d_hidden=4, n_experts=E, k=k, capacity_factor=0.5)
    moe = moekit.MoE(cfg).eval()
    with torch.no_grad():
        moe.router.weight.normal_()
    x = torch.randn(T, 8)
    perm = torch.randperm(T)
    y, info = moe(x)
    y_p, info_p = moe(x[perm])
    assert torch.allclose(y[perm], y_p, atol=1e-6)
    assert torch.equal(info.routing.experts[perm], info_p.routing.experts)
    assert torch.allclose(info.metrics["dropped_fraction"], info_p.metrics["dropped_fraction"])


@given(st.integers(0, 64), st.integers(1, 16), st.floats(0.1, 2.0))
def test_everything_to_one_expert_drops_the_exact_overflow(T, E, cf):
    k = 1
    experts = torch.zeros(T, k, dtype=torch.long)
    priority = torch.rand(T, k)
    C = math.ceil(cf * T * k / E)
    plan = make_plan(experts, torch.ones(T, k), priority, E, C)
    assert int(plan.counts_E[0]) == min(T, C)
    assert int(plan.kept_TK.sum()) == min(T, C)
    assert torch.equal(plan.weights_TK, plan.kept_TK.to(torch.float32))


def test_layer_reports_dropped_fraction_of_forced_overflow():
    """Every token to expert 0 with capacity C: dropped fraction is 1 - C / T exactly."""
    E, T, cf = 4, 40, 1.0
    cfg = moekit.MoEConfig(d_model=8, d_hidden=4, n_experts=E, k=1, capacity_factor=cf)
    moe = moekit.MoE(cfg)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0
    x = torch.randn(T, 8).abs()  # positive feature 0: expert 0 always wins
    _, info = moe(x)
    C = math.ceil(cf * T / E)
    assert torch.isclose(info.metrics["dropped_fraction"], torch.tensor(1 - C / T))
    assert torch.isclose(info.metrics["expert_load"][0], torch.tensor(1.0))


@given(routings(), st.integers(1, 9))
def test_combine_is_each_tokens_weighted_sum_and_gather_reads_its_rows(r, D):
    T, E, k, experts, priority, cf = r
    C = None if cf is None else math.ceil(cf * T * k / E)
    plan = make_plan(experts, priority, priority, E, C)
    g = torch.Generator().manual_seed(T * 31 + D)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    x_SD = gather(x, plan.token_S)
    assert torch.equal(x_SD, x[plan.token_S])
    n = int(plan.offsets_E1[-1])
    out = torch.randn(T * k, D, generator=g, dtype=torch.float64)
    for rows in (n, T * k):  # only the rows given are read
        y = combine(out[:rows], plan.token_S, plan.weight_S, T)
        want = torch.zeros(T, D, dtype=torch.float64)
        for s in range(rows):  # dropped slots (s >= n) carry weight 0
            want[plan.token_S[s]] += plan.weight_S[s] * out[s]
        assert torch.allclose(y, want, rtol=1e-12, atol=1e-12)
    unweighted = combine(out[:n], plan.token_S, None, T)
    want = torch.zeros(T, D, dtype=torch.float64).index_add(0, plan.token_S[:n], out[:n])
    assert torch.equal(unweighted, want)


def test_combine_accumulates_half_rows_in_the_weights_dtype():
    """bfloat16 outputs with float32 weights: summed in float32, rounded once."""
    token_S = torch.tensor([0, 0, 0, 1])
    weight_S = torch.tensor([1.0, 1.0, 1.0, 0.5])
    out = torch.tensor([[1.0], [2.0**-8], [2.0**-8], [3.0]], dtype=torch.bfloat16)
    y = combine(out, token_S, weight_S, 2)
    assert y.dtype == torch.bfloat16
    # bfloat16 steps by 2^-7 at 1: a bfloat16 running sum would round 1 + 2^-8 back to 1 twice
    assert y[0, 0].item() == 1.0 + 2.0**-7 and y[1, 0].item() == 1.5


class _SlotsThenCombine(Dispatcher):
    """A dispatcher that never lets the backend fuse: per-slot outputs, then `combine`."""

    def __init__(self) -> None:
        self.calls = 0

    def slots(self, x_TD, plan, run, overlap=None):
        self.calls += 1
        out_ND = run.per_slot(gather(x_TD, plan.token_S), plan.offsets_E1)
        return out_ND, overlap() if overlap is not None else None

    def extra_repr(self) -> str:
        return ", dispatcher=slots-then-combine"


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
@pytest.mark.parametrize("shared", [0, 1])
def test_local_dispatcher_and_a_swapped_one_equal_the_reference(capacity_factor, shared):
    """The dispatcher seam: the layer's own LocalDispatcher and one swapped in give the
    reference's output, shared experts and dense fallback included."""
    moe = make_moe(capacity_factor=capacity_factor, n_shared_experts=shared, fallback="dense")
    assert isinstance(moe.dispatcher, LocalDispatcher)
    x = torch.randn(11, 8, dtype=torch.float64)
    ref = forward_backward(lambda t: moekit.reference.moe_forward(moe, t), moe, x)
    local = forward_backward(moe, moe, x)
    moe.dispatcher = swapped = _SlotsThenCombine()
    other = forward_backward(moe, moe, x)
    assert swapped.calls == 1 and "slots-then-combine" in repr(moe)
    for run in (local, other):
        assert torch.allclose(run.y, ref.y, rtol=1e-10, atol=1e-12)
        assert torch.allclose(run.grad_x, ref.grad_x, rtol=1e-10, atol=1e-12)
        for name, g in ref.grads.items():
            assert torch.allclose(run.grads[name], g, rtol=1e-10, atol=1e-12), name


def test_local_slots_combine_to_the_fused_forward():
    moe = make_moe(capacity_factor=0.75)
    x = torch.randn(9, 8, dtype=torch.float64)
    _, plan = moe.route(x)
    experts = moe.bind(x, moe.backend(x))
    y_TD, none = LocalDispatcher().combined(x, plan, experts)
    out_ND, _ = LocalDispatcher().slots(x, plan, experts)
    assert none is None
    assert torch.allclose(combine(out_ND, plan.token_S, plan.weight_S, 9), y_TD, atol=1e-12)
