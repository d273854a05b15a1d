from dataclasses import replace

import pytest
import torch
from tests.oracle import forward_backward, make_moe

import moekit
from moekit.backends import get_backend, unsupported_reason


@pytest.mark.skipif(
    unsupported_reason("grouped_mm", torch.device("cpu"), torch.float32) is not None,
    reason="torch._grouped_mm unavailable here",
)
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_mm_matches_torch_backend(capacity_factor, bias):
    torch.manual_seed(0)
    moe = make_moe(
        dtype=torch.float32,
        d_model=16,
        d_hidden=8,
        n_experts=6,
        capacity_factor=capacity_factor,
        expert=moekit.ExpertConfig(bias=bias),
    )
    x = torch.randn(37, 16)
    gmm = moekit.MoE(replace(moe.cfg, backend="grouped_mm")).eval()
    gmm.load_state_dict(moe.state_dict())
    y, _, gx, grads = forward_backward(moe, moe, x)
    y_gmm, _, gx_gmm, grads_gmm = forward_backward(gmm, gmm, x)
    assert set(grads) == set(grads_gmm) and {"experts.w1", "router.weight"} <= set(grads)
    for a, b in ((y, y_gmm), (gx, gx_gmm), *((grads[n], grads_gmm[n]) for n in grads)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_unsupported_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="grouped_mm.*cannot run here"):
        get_backend("grouped_mm", torch.device("cpu"), torch.float64)


def test_auto_on_cpu_is_torch():
    assert get_backend("auto", torch.device("cpu"), torch.float32).name == "torch"


@pytest.mark.skipif(
    unsupported_reason("grouped_mm", torch.device("cpu"), torch.float32) is not None,
    reason="torch._grouped_mm unavailable here",
)
@pytest.mark.parametrize("bias", [False, True])
def test_per_slot_matches_torch_backend_and_is_zero_past_the_kept_rows(bias):
    from moekit.dispatch import gather, make_plan
    from moekit.types import ExpertWeights

    g = torch.Generator().manual_seed(3)
    E, D, H = 4, 16, 12
    leaves = [torch.randn(E, D, H, generator=g), torch.randn(E, H, D, generator=g)]
    leaves += [torch.randn(E, H, generator=g), torch.randn(E, D, generator=g)] if bias else []
    experts = torch.randint(0, E, (21, 2), generator=g)
    plan = make_plan(experts, torch.ones(21, 2), torch.rand(21, 2, generator=g), E, capacity=7)
    x_SD = gather(torch.randn(21, D, generator=g), plan.token_S)
    n = int(plan.offsets_E1[-1])
    assert n < 42  # capacity dropped some slots
    results = []
    for name in ("torch", "grouped_mm"):
        backend = get_backend(name, torch.device("cpu"), torch.float32)
        params = [t.clone().requires_grad_() for t in [x_SD, *leaves]]
        w = ExpertWeights(params[1], params[2], *(params[3:] if bias else (None, None)))
        out = backend.per_slot(params[0], plan.offsets_E1, w, "gelu")
        grads = torch.autograd.grad(out[:n].square().sum(), params)
        results.append((out, grads))
    (ref, ref_grads), (out, grads) = results
    assert out.shape == (42, D) and torch.equal(out[n:], torch.zeros(42 - n, D))
    assert torch.allclose(out[:n], ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
