import pytest
import torch

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
    cfg = moekit.MoEConfig(
        d_model=16,
        d_hidden=8,
        n_experts=6,
        k=2,
        capacity_factor=capacity_factor,
        expert=moekit.ExpertConfig(bias=bias),
        backend="torch",
    )
    moe = moekit.MoE(cfg)
    with torch.no_grad():
        moe.router.weight.normal_()
        if bias:
            moe.experts.b1.normal_()
            moe.experts.b2.normal_()
    x = torch.randn(37, 16)
    outs = []
    for backend in ("torch", "grouped_mm"):
        moe.cfg.backend = backend
        moe.zero_grad()
        xi = x.clone().requires_grad_()
        y, _ = moe(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(
            (
                y,
                xi.grad,
                moe.experts.w1.grad.clone(),
                moe.experts.w2.grad.clone(),
                moe.router.weight.grad.clone(),
            )
        )
    for a, b in zip(*outs, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_unsupported_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="grouped_mm.*cannot run here"):
        get_backend("grouped_mm", torch.device("cpu"), torch.float64)


def test_auto_on_cpu_is_torch():
    from moekit.backends import torch as torch_backend

    assert get_backend("auto", torch.device("cpu"), torch.float32) is torch_backend.experts_forward
