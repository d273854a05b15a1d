"""The torch backend vs the oracle, including both places the gate weight can be applied."""

import pytest
import torch

import moekit
from moekit.backends.torch import TorchBackend
from moekit.dispatch import combine, gather, make_plan
from moekit.types import ExpertWeights

BACKEND = TorchBackend()


@pytest.mark.parametrize("capacity_factor", [None, 0.8])
@pytest.mark.parametrize("bias", [False, True])  # with b2 the weight scales the output
@pytest.mark.parametrize("d_hidden", [3, 12])  # H < D scales the activation, H > D the output
def test_matches_reference_with_gradients(capacity_factor, bias, d_hidden):
    torch.manual_seed(0)
    cfg = moekit.MoEConfig(
        d_model=8,
        d_hidden=d_hidden,
        n_experts=6,
        k=2,
        capacity_factor=capacity_factor,
        expert=moekit.ExpertConfig(bias=bias),
        backend="torch",
    )
    moe = moekit.MoE(cfg).double().eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.5)
    x = torch.randn(23, 8, dtype=torch.float64)
    results = []
    for fn in (moe, lambda t: moekit.reference.moe_forward(moe, t)):
        moe.zero_grad()
        xi = x.clone().requires_grad_()
        y, _ = fn(xi)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        results.append([y.detach(), xi.grad] + [p.grad.clone() for p in moe.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_all_tokens_dropped_gives_zeros():
    moe = moekit.MoE(moekit.MoEConfig(d_model=4, d_hidden=4, n_experts=2, k=1, backend="torch"))
    plan = make_plan(torch.full((3, 1), -1), torch.zeros(3, 1), torch.zeros(3, 1), 2)
    e = moe.experts
    y = BACKEND.forward(torch.randn(3, 4), plan, ExpertWeights(e.w1, e.w2), "swiglu")
    assert torch.equal(y, torch.zeros(3, 4))


@pytest.mark.parametrize("bias", [False, True])
def test_inference_path_writes_the_same_output(bias):
    """Under no_grad the slices are written in place; the result must not change."""
    torch.manual_seed(1)
    cfg = moekit.MoEConfig(
        d_model=8, d_hidden=12, n_experts=5, k=2, expert=moekit.ExpertConfig(bias=bias)
    )
    moe = moekit.MoE(cfg).double().eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.5)
    x = torch.randn(31, 8, dtype=torch.float64)
    y_grad, _ = moe(x)
    with torch.no_grad():
        y_inf, _ = moe(x)
    y_ref, _ = moekit.reference.moe_forward(moe, x)
    assert torch.allclose(y_inf, y_grad, rtol=1e-12, atol=1e-14)
    assert torch.allclose(y_inf, y_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("capacity_factor", [None, 0.8])
@pytest.mark.parametrize("bias", [False, True])
def test_per_slot_outputs_are_each_slots_own_expert(capacity_factor, bias):
    """per_slot: row s is expert(x[token s]) unweighted; combined, it is the layer's y."""
    torch.manual_seed(2)
    cfg = moekit.MoEConfig(
        d_model=8,
        d_hidden=5,
        n_experts=4,
        k=2,
        capacity_factor=capacity_factor,
        expert=moekit.ExpertConfig(bias=bias),
    )
    moe = moekit.MoE(cfg).double()
    x = torch.randn(13, 8, dtype=torch.float64)
    _, plan = moe.route(x)
    e = moe.experts
    w = ExpertWeights(e.w1, e.w2, e.b1, e.b2)
    out = BACKEND.per_slot(gather(x, plan.token_S), plan.offsets_E1, w, e.activation)
    n = int(plan.offsets_E1[-1])
    assert out.shape == (n, 8) and (n < 26) == (capacity_factor is not None)
    for s in range(n):
        want = e.expert(int(plan.expert_S[s]), x[plan.token_S[s]][None])[0]
        assert torch.allclose(out[s], want, rtol=1e-12, atol=1e-12)
    y = BACKEND.forward(x, plan, w, e.activation)
    assert torch.allclose(combine(out, plan.token_S, plan.weight_S, 13), y, rtol=1e-12, atol=1e-14)
