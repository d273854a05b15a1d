"""GPU checks of the fused Triton backend: accuracy against float64, determinism, no host
sync, CUDA-graph capture and torch.compile of the whole layer.

Shape legend: T tokens, K slots per token, E experts, D model dim, H expert hidden.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from tests.oracle import by_weights  # noqa: E402

from moekit import MoE, MoEConfig  # noqa: E402
from moekit.backends.torch import TorchBackend  # noqa: E402
from moekit.backends.triton import TritonBackend  # noqa: E402
from moekit.dispatch import gather, make_plan  # noqa: E402
from moekit.types import ACTIVATIONS, GATED_ACTIVATIONS  # noqa: E402

torch_experts, torch_per_slot = by_weights(TorchBackend())
triton_experts, triton_per_slot = by_weights(TritonBackend())


def _case(seed: int, activation: str, dtype: torch.dtype, bias: bool, transposed: bool):
    """Fresh random sizes (not multiples of the blocks) and tensors for one check."""
    g = torch.Generator().manual_seed(seed)
    T = int(torch.randint(1, 300, (1,), generator=g))
    E = int(torch.randint(2, 17, (1,), generator=g))
    K = int(torch.randint(1, E + 1, (1,), generator=g))
    D = 8 * int(torch.randint(4, 40, (1,), generator=g))
    H = int(torch.randint(17, 200, (1,), generator=g))
    H1 = 2 * H if activation in GATED_ACTIVATIONS else H
    dev = "cuda"
    x = torch.randn(T, D, generator=g).to(dev, dtype)
    w1 = torch.randn(E, H1, D, generator=g).mul(D**-0.5).to(dev, dtype)
    w2 = torch.randn(E, D, H, generator=g).mul(H**-0.5).to(dev, dtype)
    w1 = w1.transpose(1, 2) if transposed else w1.transpose(1, 2).contiguous()
    w2 = w2.transpose(1, 2) if transposed else w2.transpose(1, 2).contiguous()
    b1 = torch.randn(E, H1, generator=g).to(dev, dtype) if bias else None
    b2 = torch.randn(E, D, generator=g).to(dev, dtype) if bias else None
    logits = torch.randn(T, E, generator=g).to(dev)
    capacity = int(torch.randint(1, 2 * T, (1,), generator=g)) if seed % 2 else None
    return x, w1, w2, b1, b2, logits, K, capacity


def _run(fn, x, w1, w2, b1, b2, logits, K, capacity, activation, dy):
    """y and the gradients of (x, w1, w2, b1, b2, logits) through one backend."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2) if t is not None]
    biases = [t.detach().clone().requires_grad_() if t is not None else None for t in (b1, b2)]
    lg = logits.detach().clone().to(x.dtype if x.dtype == torch.float64 else torch.float32)
    lg.requires_grad_()
    weights, experts = torch.softmax(lg, -1).topk(K, -1)
    plan = make_plan(experts, weights, weights.detach(), lg.shape[1], capacity)
    y = fn(leaves[0], plan, leaves[1], leaves[2], biases[0], biases[1], activation)
    params = leaves + [b for b in biases if b is not None] + [lg]
    return [y, *torch.autograd.grad(y, params, dy.to(y.dtype))]


# every activation in bf16, two in fp32 (each case compiles its own kernels: keep them few)
CHECKS = [(a, torch.bfloat16) for a in ACTIVATIONS] + [
    ("swiglu", torch.float32),
    ("gelu", torch.float32),
]


@pytest.mark.parametrize(("activation", "dtype"), CHECKS)
def test_matches_float64_reference(activation: str, dtype: torch.dtype) -> None:
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for seed in (ACTIVATIONS.index(activation), 11 + ACTIVATIONS.index(activation)):
        # odd seeds route with a capacity (drops); biases and layouts vary with the seed
        case = _case(seed, activation, dtype, bias=seed % 3 == 1, transposed=seed % 2 == 0)
        x, w1, w2, b1, b2, logits, K, capacity = case
        dy = torch.randn(x.shape, device="cuda").to(dtype).double()  # exact in both dtypes
        f64 = [t.double() if t is not None else None for t in (x, w1, w2, b1, b2)]
        ref = _run(torch_experts, *f64, logits, K, capacity, activation, dy)
        out = _run(triton_experts, x, w1, w2, b1, b2, logits, K, capacity, activation, dy)
        names = ["y", "dx", "dw1", "dw2"] + ["db1", "db2"] * (b1 is not None) + ["dlogits"]
        for name, o, r in zip(names, out, ref, strict=True):
            assert name == "dlogits" or o.dtype == dtype, name
            assert torch.isfinite(o).all(), name
            err = ((o.double() - r).norm() / r.norm().clamp_min(1e-30)).item()
            assert err < tol, f"{name}: rel err {err:.2e} (seed {seed}, T={x.shape[0]})"


def test_deterministic_and_no_host_sync() -> None:
    x, w1, w2, b1, b2, logits, K, _ = _case(7, "swiglu", torch.bfloat16, False, True)
    dy = torch.randn(x.shape, device="cuda", dtype=torch.float64)
    torch.cuda.set_sync_debug_mode("error")
    try:
        first = _run(triton_experts, x, w1, w2, b1, b2, logits, K, None, "swiglu", dy)
        second = _run(triton_experts, x, w1, w2, b1, b2, logits, K, None, "swiglu", dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def _layer() -> MoE:
    cfg = MoEConfig(d_model=256, d_hidden=320, n_experts=8, k=2, backend="triton")
    return MoE(cfg).to("cuda", torch.bfloat16).eval()


@torch.no_grad()
def test_cuda_graph_replays_the_layer() -> None:
    moe = _layer()
    static_x = torch.randn(37, 256, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            moe(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y, _ = moe(static_x)
    for _ in range(2):
        fresh = torch.randn_like(static_x)
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        eager, _ = moe(fresh)
        assert torch.equal(static_y, eager)


def test_torch_compile_runs_the_layer() -> None:
    moe = _layer()
    x = torch.randn(2, 19, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(moe, fullgraph=False)
    y, _ = compiled(x)
    y_eager, _ = moe(x)
    assert torch.equal(y, y_eager)
    y.float().square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_per_slot_matches_float64_reference(dtype: torch.dtype) -> None:
    """experts_per_slot (expert parallelism's and the librarian's half) and its gradients."""
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    x, w1, w2, b1, b2, logits, K, capacity = _case(3, "swiglu", dtype, True, True)
    weights, experts = torch.softmax(logits, -1).topk(K, -1)
    plan = make_plan(experts, weights, weights, logits.shape[1], capacity)
    n = int(plan.offsets_E1[-1])
    dout = torch.randn(n, x.shape[1], device="cuda").to(dtype)  # exact in both dtypes
    results = []
    for fn, cast in ((torch_per_slot, torch.float64), (triton_per_slot, dtype)):
        params = [t.detach().to(cast).requires_grad_() for t in (x, w1, w2, b1, b2)]
        out = fn(gather(params[0], plan.token_S), plan.offsets_E1, *params[1:], "swiglu")
        grads = torch.autograd.grad(out[:n], params, dout.to(cast))
        results.append((out, grads))
    (ref, ref_grads), (out, grads) = results
    assert out.dtype == dtype and torch.equal(out[n:], torch.zeros_like(out[n:]))
    for name, o, r in zip(
        ["out", "dx", "dw1", "dw2", "db1", "db2"], (out[:n], *grads), (ref, *ref_grads), strict=True
    ):
        err = ((o.double() - r).norm() / r.norm().clamp_min(1e-30)).item()
        assert err < tol, f"{name}: rel err {err:.2e}"
