"""Both strategies of the torch backend (per-expert loop, padded batched matmul) vs the oracle."""

import pytest
import torch

import moekit
import moekit.backends.torch as torch_backend


@pytest.mark.parametrize("strategy", ["per_expert", "padded"])
@pytest.mark.parametrize("capacity_factor", [None, 0.8])
@pytest.mark.parametrize("bias", [False, True])
def test_strategy_matches_reference(monkeypatch, strategy, capacity_factor, bias):
    if strategy == "padded":  # force padding whatever the imbalance
        monkeypatch.setattr(torch_backend, "_MAX_PADDING", float("inf"))
        monkeypatch.setattr(torch_backend, "_MIN_EXPERTS_TO_PAD", 1)
    else:
        monkeypatch.setattr(torch_backend, "_MAX_PADDING", -1.0)
    calls = []
    chosen = torch_backend._padded if strategy == "padded" else torch_backend._per_expert
    monkeypatch.setattr(
        torch_backend, chosen.__name__, lambda *a, **k: calls.append(1) or chosen(*a, **k)
    )
    torch.manual_seed(0)
    cfg = moekit.MoEConfig(
        d_model=8,
        d_hidden=5,
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
    grads = []
    for fn in (moe, lambda t: moekit.reference.moe_forward(moe, t)):
        moe.zero_grad()
        xi = x.clone().requires_grad_()
        y, _ = fn(xi)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        grads.append([y.detach(), xi.grad] + [p.grad.clone() for p in moe.parameters()])
    assert calls, f"the {strategy} strategy did not run"
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_all_tokens_dropped_gives_zeros():
    cfg = moekit.MoEConfig(d_model=4, d_hidden=4, n_experts=2, k=1, backend="torch")
    moe = moekit.MoE(cfg)
    from moekit.dispatch import make_plan

    experts = torch.full((3, 1), -1)
    plan = make_plan(experts, torch.zeros(3, 1), torch.zeros(3, 1), 2)
    e = moe.experts
    y = torch_backend.experts_forward(torch.randn(3, 4), plan, e.w1, e.w2, None, None, "swiglu")
    assert torch.equal(y, torch.zeros(3, 4))
