"""The layer against `moekit.reference` for every router, capacity mode and activation."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tests.oracle import against_reference, rel
from tests.oracle import make_moe as oracle_moe

import moekit

ROUTERS = ("topk", "sigmoid", "expert_choice", "sinkhorn")


def make_moe(kind, capacity_factor, activation, dtype, bias=True, noise="none", **extra):
    """The oracle's layer with loss weights large enough to show in the gradients."""
    router = moekit.RouterConfig(
        kind=kind, load_balance_weight=0.1, z_loss_weight=0.01, noise=noise, noise_std=2.0
    )
    expert = moekit.ExpertConfig(activation=activation, bias=bias)
    return oracle_moe(router, dtype=dtype, capacity_factor=capacity_factor, expert=expert, **extra)


@pytest.mark.parametrize("kind", ROUTERS)
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "reglu"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_matches_reference(kind, capacity_factor, activation, dtype, tol):
    torch.manual_seed(0)
    moe = make_moe(kind, capacity_factor, activation, dtype)
    x = torch.randn(3, 5, 8, dtype=dtype)
    (y, info, gx, grads), (y_ref, info_ref, gx_ref, grads_ref) = against_reference(moe, x)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.equal(info.routing.experts, info_ref.routing.experts)
    assert rel(y, y_ref) < tol
    assert rel(gx, gx_ref) < tol
    assert set(grads) == set(grads_ref) and {"router.weight", "experts.w1", "experts.w2"} <= set(
        grads
    )
    for name in grads:
        assert rel(grads[name], grads_ref[name]) < tol, name
    assert abs(info.aux_loss.item() - info_ref.aux_loss.item()) < tol
    for key in ("expert_load", "dropped_fraction", "load_balance", "z_loss", "entropy"):
        assert torch.allclose(info.metrics[key], info_ref.metrics[key], atol=1e-6), key


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu", "swiglu", "geglu", "reglu"])
def test_every_activation_matches_reference(activation):
    torch.manual_seed(1)
    moe = make_moe("topk", None, activation, torch.float64)
    x = torch.randn(7, 8, dtype=torch.float64)
    (y, *_), (y_ref, *_) = against_reference(moe, x)
    assert rel(y, y_ref) < 1e-10


@pytest.mark.parametrize("kind", ROUTERS)
def test_gradcheck_tiny_float64(kind):
    """Finite differences agree with autograd for x and every parameter (routing held fixed)."""
    torch.manual_seed(2)
    moe = make_moe(kind, 1.0, "swiglu", torch.float64)
    names = [n for n, _ in moe.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in moe.parameters())
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)

    def f(x_, *ps):
        y, info = torch.func.functional_call(moe, dict(zip(names, ps, strict=True)), (x_,))
        return y, info.aux_loss

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, fast_mode=True)


def test_shared_experts_and_dense_fallback_match_reference():
    torch.manual_seed(3)
    moe = make_moe("topk", 0.25, "swiglu", torch.float64, n_shared_experts=2, fallback="dense")
    x = torch.randn(16, 8, dtype=torch.float64)
    (y, info, gx, _), (y_ref, info_ref, gx_ref, _) = against_reference(moe, x)
    assert info.metrics["unrouted_fraction"] > 0  # some tokens lost every expert
    assert rel(y, y_ref) < 1e-10 and rel(gx, gx_ref) < 1e-10
    lost = ~(info.routing.experts >= 0).any(-1)
    shared_and_fallback = moe.shared(x) + moe.fallback(x)
    assert torch.allclose(y[lost], shared_and_fallback[lost])


@pytest.mark.parametrize("weight", [0.0, 0.25, 3.0])
def test_fallback_weight_scales_the_dense_fallback_as_the_reference_does(weight):
    torch.manual_seed(3)
    moe = make_moe("topk", 0.25, "swiglu", torch.float64, fallback="dense", fallback_weight=weight)
    x = torch.randn(16, 8, dtype=torch.float64)
    (y, info, gx, grads), (y_ref, _, gx_ref, grads_ref) = against_reference(moe, x)
    assert rel(y, y_ref) < 1e-10 and rel(gx, gx_ref) < 1e-10
    if weight:
        assert rel(grads["fallback.w1"], grads_ref["fallback.w1"]) < 1e-10
    lost = ~(info.routing.experts >= 0).any(-1)
    assert lost.any()
    assert torch.allclose(y[lost], weight * moe.fallback(x)[lost])


def test_fallback_weight_is_checked():
    with pytest.raises(ValueError, match="fallback_weight"):
        moekit.MoEConfig(fallback="dense", fallback_weight=-1.0)
    with pytest.raises(ValueError, match="fallback_weight.*fallback='dense'"):
        moekit.MoEConfig(fallback_weight=0.5)


@pytest.mark.parametrize("kind", ROUTERS)
@pytest.mark.parametrize("capacity_factor", [None, 0.75, 1.5])
def test_capacity_is_reported_when_slots_can_drop(kind, capacity_factor):
    """metrics["capacity"] is C = ceil(cf * T * k / E) as a float32 scalar, as the reference
    reports it; dropless layers (and expert choice, which sizes its own) have no such key."""
    torch.manual_seed(7)
    moe = make_moe(kind, capacity_factor, "swiglu", torch.float64)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    info = moe(x)[1]
    info_ref = moekit.reference.moe_forward(moe, x)[1]
    if capacity_factor is None or kind == "expert_choice":
        assert "capacity" not in info.metrics and "capacity" not in info_ref.metrics
        return
    C = math.ceil(capacity_factor * 15 * moe.cfg.k / moe.cfg.n_experts)
    assert info.metrics["capacity"].shape == () and info.metrics["capacity"].item() == C
    assert info.metrics["capacity"].dtype == torch.float32
    assert torch.equal(info.metrics["capacity"], info_ref.metrics["capacity"])


def test_renormalize_after_drop_restores_weight_sum():
    torch.manual_seed(4)
    moe = make_moe("topk", 0.5, "swiglu", torch.float64, renormalize_after_drop=True)
    x = torch.randn(20, 8, dtype=torch.float64)
    (y, info, *_), (y_ref, *_) = against_reference(moe, x)
    assert rel(y, y_ref) < 1e-10
    w = info.routing.weights
    survived = (info.routing.experts >= 0).any(-1)
    assert torch.allclose(w[survived].sum(-1), torch.ones(int(survived.sum()), dtype=w.dtype))


def test_empty_input_and_leading_shapes():
    moe = make_moe("topk", 1.0, "swiglu", torch.float32)
    y, info = moe(torch.randn(0, 8))
    assert y.shape == (0, 8) and info.aux_loss.shape == ()
    y, info = moe(torch.randn(2, 0, 8))
    assert y.shape == (2, 0, 8)
    x = torch.randn(2, 3, 4, 8)
    y, info = moe(x)
    assert y.shape == x.shape and info.routing.experts.shape == (24, 2)
    assert torch.allclose(info.metrics["expert_load"].sum(), torch.tensor(1.0))


def test_bad_inputs_name_the_problem():
    moe = make_moe("topk", None, "swiglu", torch.float32)
    with pytest.raises(ValueError, match="d_model=8"):
        moe(torch.randn(3, 7))
    with pytest.raises(ValueError, match="floating-point"):
        moe(torch.ones(3, 8, dtype=torch.long))
    debug = make_moe("topk", None, "swiglu", torch.float32, debug=True)
    with pytest.raises(ValueError, match="NaN"):
        debug(torch.full((2, 8), float("nan")))


def test_noise_only_in_training():
    torch.manual_seed(5)
    for noise in ("gaussian", "gumbel", "jitter"):
        moe = make_moe("topk", None, "swiglu", torch.float32, noise=noise)
        x = torch.randn(64, 8)
        moe.eval()
        y1, _ = moe(x)
        y2, _ = moe(x)
        assert torch.equal(y1, y2)
        moe.train()
        _, i1 = moe(x)
        _, i2 = moe(x)
        assert not torch.equal(i1.routing.experts, i2.routing.experts), noise
    with pytest.raises(ValueError, match="deterministic"):
        moekit.reference.moe_forward(moe, x)


def test_hf_layout_weights_through_strides():
    """Backends read w1 through strides: a transposed [E, 2H, D] storage gives the same y."""
    torch.manual_seed(6)
    moe = make_moe("topk", None, "swiglu", torch.float32)
    x = torch.randn(10, 8)
    y, _ = moe(x)
    gate_up_proj = moe.experts.w1.detach().transpose(1, 2).contiguous()  # [E, 2H, D]
    with torch.no_grad():
        moe.experts.w1 = torch.nn.Parameter(gate_up_proj.transpose(1, 2))
    assert not moe.experts.w1.is_contiguous()
    y2, _ = moe(x)
    assert torch.allclose(y, y2, atol=1e-6)


@given(
    T=st.sampled_from([0, 1, 2, 5, 13]),
    E=st.integers(1, 24),
    k_frac=st.floats(0, 1),
    D=st.integers(1, 9),
    H=st.integers(1, 7),
    kind=st.sampled_from(ROUTERS),
    cf=st.sampled_from([None, 0.5, 1.5]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_reference(T, E, k_frac, D, H, kind, cf, seed):
    torch.manual_seed(seed)
    k = 1 + int(k_frac * (min(E, 8) - 1))
    cfg = moekit.MoEConfig(
        d_model=D,
        d_hidden=H,
        n_experts=E,
        k=k,
        capacity_factor=cf,
        router=moekit.RouterConfig(kind=kind),
        backend="torch",
    )
    moe = moekit.MoE(cfg).double().eval()
    with torch.no_grad():
        moe.router.weight.normal_()
    x = torch.randn(T, D, dtype=torch.float64)
    y, info = moe(x)
    y_ref, info_ref = moekit.reference.moe_forward(moe, x)
    assert y.shape == (T, D)
    assert torch.equal(info.routing.experts, info_ref.routing.experts)
    assert torch.allclose(y, y_ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(info.metrics["dropped_fraction"], info_ref.metrics["dropped_fraction"])


def _autocast_run(moe, x):
    moe.zero_grad()
    x = x.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = moe(x)
    y.float().square().sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in moe.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["grouped_mm"])  # triton in bf16: tests/gpu (no CPU bf16)
def test_autocast_experts_run_on_bf16_weights_with_fp32_gradients(backend):
    """Under autocast every backend multiplies by the bf16 cast of the fp32 master weights
    (autocast does not reach custom ops, so the layer casts), and gradients reach fp32."""
    torch.manual_seed(0)
    cfg = moekit.MoEConfig(d_model=32, d_hidden=48, n_experts=4, k=2, backend="torch")
    ref = moekit.MoE(cfg)
    other = moekit.MoE(dataclasses.replace(cfg, backend=backend))
    other.load_state_dict(ref.state_dict())
    x = torch.randn(10, 32)
    y_ref, gx_ref, g_ref = _autocast_run(ref, x)
    y, gx, g = _autocast_run(other, x)
    assert y.dtype == torch.bfloat16 and all(v.dtype == torch.float32 for v in g.values())
    assert (y.float() - y_ref.float()).norm() <= 1e-2 * y_ref.float().norm()
    assert (gx - gx_ref).norm() <= 2e-2 * gx_ref.norm()
    for name, grad in g_ref.items():
        assert (g[name] - grad).norm() <= 2e-2 * grad.norm(), name
