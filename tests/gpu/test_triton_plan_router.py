"""GPU checks of the counting-sort plan and the fused router kernel: equal to the CPU plan and
the routers' torch code, no host sync, CUDA-graph capture and torch.compile.

Shape legend: T tokens, K slots per token, E experts.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from moekit import MoE, MoEConfig  # noqa: E402
from moekit.backends.triton import TritonBackend  # noqa: E402
from moekit.config import RouterConfig  # noqa: E402
from moekit.dispatch import make_plan  # noqa: E402
from moekit.routing import build_router  # noqa: E402
from moekit.types import Plan  # noqa: E402

TRITON = TritonBackend()


def _routing(T: int, K: int, E: int, seed: int, empty: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    experts = torch.rand(T, E, generator=g).argsort(-1)[:, :K]
    experts = torch.where(torch.rand(T, K, generator=g) < empty, -1, experts)
    return experts, torch.rand(T, K, generator=g)


def _assert_same(a: Plan, b: Plan) -> None:
    for name in Plan.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu()), name
        else:
            assert x == y, name


@pytest.mark.parametrize(
    "T,K,E,empty",
    [(0, 2, 8, 0.0), (1, 8, 128, 0.0), (16, 6, 64, 0.0), (4096, 8, 128, 0.0), (5000, 2, 8, 0.3)]
    + [(16384, 8, 128, 0.0), (300, 4, 4, 0.0), (64, 2, 256, 0.1)],
)
def test_counting_sort_plan_equals_the_cpu_plan(T: int, K: int, E: int, empty: float) -> None:
    experts, weights = _routing(T, K, E, seed=T + K + E, empty=empty)
    want = make_plan(experts, weights, weights, E)
    got = make_plan(experts.cuda(), weights.cuda(), weights.cuda(), E, backend=TRITON)
    _assert_same(got, want)


def test_capacity_plan_stays_sort_based() -> None:
    experts, weights = _routing(64, 2, 8, seed=0)
    want = make_plan(experts, weights, weights, 8, capacity=10)
    assert TRITON.make_plan(experts.cuda(), weights.cuda(), 8, 10) is None
    got = make_plan(experts.cuda(), weights.cuda(), weights.cuda(), 8, capacity=10, backend=TRITON)
    _assert_same(got, want)


@pytest.mark.parametrize("kind", ["topk", "sigmoid"])
@pytest.mark.parametrize("T,E,K", [(1, 8, 2), (37, 64, 6), (1024, 128, 8)])
def test_fused_router_matches_the_torch_code(kind: str, T: int, E: int, K: int) -> None:
    cfg = MoEConfig(d_model=32, d_hidden=16, n_experts=E, k=K, router=RouterConfig(kind=kind))
    router = build_router(cfg).cuda().eval()
    if kind == "sigmoid":
        router.expert_bias.copy_(torch.randn(E, device="cuda") * 0.1)
    logits = torch.randn(T, E, device="cuda")
    want = router.select(logits.clone().requires_grad_())  # the torch code
    with torch.no_grad():
        got = router.select_fused(logits, TRITON.select)  # the fused kernel
    assert got is not None
    assert torch.equal(got.experts, want.experts)
    for name in ("weights", "priority", "probs"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name).detach(), msg=name)


def test_layer_with_counting_plan_and_fused_router_captures_and_compiles() -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=64, d_hidden=32, n_experts=16, k=4, backend="triton")
    moe = MoE(cfg).cuda().eval()
    x = torch.randn(48, 64, device="cuda")
    with torch.no_grad():
        want = moe(x)[0]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            moe(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = moe(x)[0]
        graph.replay()
        torch.testing.assert_close(captured, want)
        compiled = torch.compile(lambda t: moe(t)[0], fullgraph=False)
        torch.testing.assert_close(compiled(x), want)
