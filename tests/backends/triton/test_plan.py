"""The counting-sort plan equals `dispatch.make_plan` field by field (integer work: bit-exact),
on the CPU under the Triton interpreter.

Shape legend: T tokens, K slots per token, E experts.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="the counting-sort plan needs the triton package")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from moekit.backends.triton import plan as plan_module  # noqa: E402
from moekit.backends.triton.plan import make_plan_dropless  # noqa: E402
from moekit.dispatch import make_plan  # noqa: E402
from moekit.types import Plan  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tests run under TRITON_INTERPRET=1"
)


def _assert_same(a: Plan, b: Plan) -> None:
    for name in Plan.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert torch.equal(x, y), name
        else:
            assert x == y, name


def _routing(T: int, K: int, E: int, seed: int, empty: float) -> tuple[torch.Tensor, torch.Tensor]:
    """experts [T, K] (distinct per token, -1 in a fraction `empty` of slots) and weights."""
    g = torch.Generator().manual_seed(seed)
    experts = torch.rand(T, E, generator=g).argsort(-1)[:, :K]
    experts = torch.where(torch.rand(T, K, generator=g) < empty, -1, experts)
    return experts, torch.rand(T, K, generator=g)


@pytest.mark.parametrize(
    "T,K,E,empty",
    [
        (0, 2, 4, 0.0),
        (1, 1, 1, 0.0),
        (1, 3, 3, 0.0),
        (6, 4, 4, 0.0),
        (9, 2, 8, 0.5),
        (3, 2, 3, 1.0),
    ],
)
def test_counting_sort_plan_equals_make_plan(T: int, K: int, E: int, empty: float) -> None:
    experts, weights = _routing(T, K, E, seed=T + K + E, empty=empty)
    _assert_same(make_plan_dropless(experts, weights, E), make_plan(experts, weights, weights, E))


@settings(max_examples=8, deadline=None)
@given(
    T=st.integers(0, 40),
    E=st.integers(1, 12),
    k_frac=st.floats(0.0, 1.0),
    empty=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 2**16),
)
def test_counting_sort_plan_property(T: int, E: int, k_frac: float, empty: float, seed: int):
    K = max(1, round(k_frac * E))
    experts, weights = _routing(T, K, E, seed, empty)
    _assert_same(make_plan_dropless(experts, weights, E), make_plan(experts, weights, weights, E))


def test_counting_sort_is_stable_across_programs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several programs, each over several chunks: the order stays stable by slot id."""
    monkeypatch.setattr(plan_module, "MAX_PROGRAMS", 3)
    experts = torch.randint(-1, 3, (1000, 2), generator=torch.Generator().manual_seed(0))
    weights = torch.rand(1000, 2)
    block_s, _, chunks, n_programs = plan_module._grid(2000, 4)
    assert chunks > 1 and n_programs > 1, (block_s, chunks, n_programs)
    _assert_same(make_plan_dropless(experts, weights, 3), make_plan(experts, weights, weights, 3))


def test_counting_sort_plan_carries_router_gradients() -> None:
    experts, weights = _routing(5, 2, 4, seed=0, empty=0.2)
    leaf = weights.clone().requires_grad_()
    make_plan_dropless(experts, leaf, 4).weight_S.sum().backward()
    assert torch.equal(leaf.grad, (experts >= 0).to(leaf.dtype))


def test_counting_sort_op_passes_opcheck() -> None:
    experts, _ = _routing(7, 3, 5, seed=1, empty=0.2)
    torch.library.opcheck(plan_module.counting_sort.custom, (experts, 5))


def test_eager_calls_skip_the_dispatcher_and_equal_the_registered_op() -> None:
    experts = torch.tensor([[0, 2], [1, -1], [2, 2], [4, 0]])
    direct = plan_module.counting_sort(experts, 5)
    registered = plan_module.counting_sort.custom(experts, 5)
    assert torch.ops.moekit_triton.counting_sort.default is not None
    for a, b in zip(direct, registered, strict=True):
        assert torch.equal(a, b)
