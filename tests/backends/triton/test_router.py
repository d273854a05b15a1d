"""The fused router kernel against the top-k and sigmoid routers' torch code, on the CPU under
the Triton interpreter: the same experts in the same order, weights / priority / probs to
float32 rounding.

Shape legend: T tokens, E experts, K slots per token.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="the fused router needs the triton package")

from moekit import MoEConfig  # noqa: E402
from moekit.backends.triton import TritonBackend  # noqa: E402
from moekit.backends.triton.router import fused_select, route_select  # noqa: E402
from moekit.config import RouterConfig  # noqa: E402
from moekit.routing import build_router  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tests run under TRITON_INTERPRET=1"
)


def _router(kind: str, E: int, K: int, renormalize: bool, scaling: float):
    rcfg = RouterConfig(kind=kind, renormalize=renormalize, scaling_factor=scaling)
    cfg = MoEConfig(d_model=8, d_hidden=8, n_experts=E, k=K, router=rcfg)
    router = build_router(cfg).eval()
    if kind == "sigmoid":
        router.expert_bias.copy_(torch.randn(E, generator=torch.Generator().manual_seed(3)) * 0.1)
    return router


@pytest.mark.parametrize("kind", ["topk", "sigmoid"])
@pytest.mark.parametrize(
    "T,E,K,renormalize,scaling",
    [(1, 2, 1, True, 1.0), (5, 8, 2, True, 1.0), (19, 12, 4, False, 2.5), (3, 6, 6, True, 1.0)],
)
def test_fused_select_matches_the_router(
    kind: str, T: int, E: int, K: int, renormalize: bool, scaling: float
) -> None:
    router = _router(kind, E, K, renormalize, scaling)
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T + E))
    want = router.select(logits)  # on the CPU: the torch code
    bias = router.expert_bias if kind == "sigmoid" else None
    got = fused_select(logits, K, renormalize, scaling, bias)
    assert torch.equal(got.experts, want.experts)
    for name in ("weights", "priority", "probs"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_fused_select_of_no_tokens() -> None:
    got = fused_select(torch.zeros(0, 4), 2, True, 1.0)
    assert got.experts.shape == (0, 2) and got.probs.shape == (0, 4)


def test_fused_routing_leaves_the_cpu_and_autograd_to_torch() -> None:
    logits = torch.randn(3, 4)
    assert TritonBackend().select(logits, 2, True, 1.0) is None  # CPU: the torch code
    if torch.cuda.is_available():
        leaf = logits.cuda().requires_grad_()
        assert TritonBackend().select(leaf, 2, True, 1.0) is None  # a gradient is needed


def test_route_select_op_passes_opcheck() -> None:
    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    torch.library.opcheck(route_select.custom, (logits, None, 2, True, 1.0))
    torch.library.opcheck(route_select.custom, (logits, torch.zeros(8), 3, False, 2.0))
