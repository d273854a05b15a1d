"""The layer on CUDA: every router and backend vs the float64 reference, and graph capture."""

import pytest
import torch
from tests.oracle import make_moe

import moekit
from moekit.backends import unsupported_reason

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
ROUTERS = ("topk", "sigmoid", "expert_choice", "sinkhorn", "attention")


def _backends(dtype):
    dev = torch.device("cuda")
    return [
        b for b in ("torch", "grouped_mm", "triton") if unsupported_reason(b, dev, dtype) is None
    ]


def _moe(kind, cf, backend):
    torch.manual_seed(0)
    return make_moe(
        kind,
        dtype=torch.float32,
        router_std=0.3,
        expert_std=0.1,
        d_model=64,
        d_hidden=32,
        n_experts=8,
        capacity_factor=cf,
        backend=backend,
    )


@pytest.mark.parametrize("kind", ROUTERS)
@pytest.mark.parametrize("cf", [None, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_match_float64_reference(kind, cf, dtype):
    x = torch.randn(96, 64)
    for backend in _backends(dtype):
        moe = _moe(kind, cf, backend)
        ref = moe.double()
        y_ref, info_ref = moekit.reference.moe_forward(ref, x.double())
        moe = moe.to("cuda", dtype)
        y, info = moe(x.to("cuda", dtype))
        same = (info.routing.experts.cpu() == info_ref.routing.experts).float().mean()
        if dtype == torch.float32:
            assert same == 1.0, backend
            rel = (y.double().cpu() - y_ref).norm() / y_ref.norm()
            assert rel < 1e-4, (backend, rel)
        else:  # bf16 can flip near-tied choices; compare tokens routed the same way
            assert same > 0.9, backend
            keep = (info.routing.experts.cpu() == info_ref.routing.experts).all(-1)
            rel = (y.double().cpu()[keep] - y_ref[keep]).norm() / y_ref[keep].norm()
            assert rel < 2e-2, (backend, rel)


@pytest.mark.parametrize("backend", ["grouped_mm", "triton"])
def test_layer_captures_in_a_cuda_graph(backend):
    if unsupported_reason(backend, torch.device("cuda"), torch.bfloat16) is not None:
        pytest.skip(f"{backend} unavailable")
    moe = _moe("sigmoid", 1.25, backend).to("cuda", torch.bfloat16)
    x = torch.randn(128, 64, device="cuda", dtype=torch.bfloat16)
    eager, _ = moe(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        moe(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static, _ = moe(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    y_eager, _ = moe(x)
    assert torch.equal(y_static, y_eager)
    assert not torch.equal(y_static, eager)


def test_autocast_triton_runs_on_bf16_weights_and_matches_grouped_mm():
    """Training under bf16 autocast with fp32 master weights: the layer hands the Triton
    kernels bf16 weights (not fp32 tiles), and outputs and fp32 gradients match grouped_mm's."""
    import dataclasses

    torch.manual_seed(0)
    cfg = moekit.MoEConfig(d_model=256, d_hidden=512, n_experts=8, k=2, backend="grouped_mm")
    ref = moekit.MoE(cfg).cuda()
    tri = moekit.MoE(dataclasses.replace(cfg, backend="triton")).cuda()
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(300, 256, device="cuda")
    outs = []
    for moe in (ref, tri):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = moe(xi)
        y.float().square().sum().backward()
        outs.append((y.float(), xi.grad, moe.experts.w1.grad))
    (y0, gx0, gw0), (y1, gx1, gw1) = outs
    assert gw1.dtype == torch.float32
    assert (y1 - y0).norm() <= 1e-2 * y0.norm()
    assert (gx1 - gx0).norm() <= 2e-2 * gx0.norm()
    assert (gw1 - gw0).norm() <= 2e-2 * gw0.norm()
