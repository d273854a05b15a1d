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
    from moekit.backends import torch as torch_backend

    assert get_backend("auto", torch.device("cpu"), torch.float32) is torch_backend.experts_forward
