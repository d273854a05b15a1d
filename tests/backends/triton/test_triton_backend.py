"""The fused Triton backend against the torch backend and the per-token reference, on the CPU
under the Triton interpreter (tiny shapes: the interpreter runs each program in Python).

Shape legend: T tokens, K slots per token, E experts, D model dim, H expert hidden.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="the triton backend needs the triton package")

from tests.oracle import by_weights  # noqa: E402

from moekit import MoE, MoEConfig, reference  # noqa: E402
from moekit.backends.torch import TorchBackend  # noqa: E402
from moekit.backends.triton import TritonBackend  # noqa: E402
from moekit.backends.triton.align import schedule  # noqa: E402
from moekit.backends.triton.backward import backward, backward_per_slot  # noqa: E402
from moekit.backends.triton.configs import INTERPRETER  # noqa: E402
from moekit.backends.triton.down import combine as combine_op  # noqa: E402
from moekit.backends.triton.down import down  # noqa: E402
from moekit.backends.triton.up import Tiles, gemm_down, gemm_dx, gemm_up, up  # noqa: E402
from moekit.dispatch import combine as combine_rows  # noqa: E402
from moekit.dispatch import make_plan  # noqa: E402
from moekit.types import GATED_ACTIVATIONS  # noqa: E402

torch_experts, torch_per_slot = by_weights(TorchBackend())
triton_experts, triton_per_slot = by_weights(TritonBackend())

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tests run under TRITON_INTERPRET=1"
)


def _grads(fn, x, w1, w2, b1, b2, logits, K, capacity, activation, experts=None):
    """y and d(x, w1, w2, b1, b2, logits) through one backend, on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2)]
    biases = [t.detach().clone().requires_grad_() if t is not None else None for t in (b1, b2)]
    lg = logits.detach().clone().requires_grad_()
    weights, top = torch.softmax(lg, -1).topk(K, -1)
    experts = top if experts is None else experts
    plan = make_plan(experts, weights, weights.detach(), logits.shape[1], capacity)
    y = fn(leaves[0], plan, leaves[1], leaves[2], biases[0], biases[1], activation)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    params = leaves + [b for b in biases if b is not None] + [lg]
    return [y, *torch.autograd.grad(y, params, dy)]


def _tensors(T, E, D, H, activation, dtype, bias, transposed, seed=0):
    g = torch.Generator().manual_seed(seed)
    H1 = 2 * H if activation in GATED_ACTIVATIONS else H
    x = torch.randn(T, D, generator=g, dtype=dtype)
    if transposed:  # the Hugging Face layout, read through strides
        w1 = (torch.randn(E, H1, D, generator=g) * 0.3).to(dtype).transpose(1, 2)
        w2 = (torch.randn(E, D, H, generator=g) * 0.3).to(dtype).transpose(1, 2)
    else:
        w1 = (torch.randn(E, D, H1, generator=g) * 0.3).to(dtype)
        w2 = (torch.randn(E, H, D, generator=g) * 0.3).to(dtype)
    b1 = torch.randn(E, H1, generator=g, dtype=dtype) if bias else None
    b2 = torch.randn(E, D, generator=g, dtype=dtype) if bias else None
    return x, w1, w2, b1, b2, torch.randn(T, E, generator=g)


CASES = [  # T, E, K, D, H, activation, bias, capacity, transposed
    (5, 4, 2, 24, 20, "swiglu", True, None, False),  # T, D, H not multiples of the block
    (6, 4, 2, 16, 12, "gelu", False, 2, True),  # capacity drops, transposed views
    (1, 4, 2, 16, 16, "reglu", False, None, True),  # one token
    (4, 3, 3, 16, 8, "silu", True, 3, False),  # k = E with drops
    (19, 2, 1, 8, 16, "relu", False, None, False),  # an expert spans two tiles
    (3, 6, 2, 16, 8, "geglu", True, None, False),  # most experts empty
]


@pytest.mark.parametrize(("T", "E", "K", "D", "H", "activation", "bias", "capacity", "tr"), CASES)
def test_matches_torch_backend(T, E, K, D, H, activation, bias, capacity, tr) -> None:
    x, w1, w2, b1, b2, logits = _tensors(T, E, D, H, activation, torch.float32, bias, tr)
    args = (x, w1, w2, b1, b2, logits, K, capacity, activation)
    ref = _grads(torch_experts, *args)
    out = _grads(triton_experts, *args)
    names = ["y", "dx", "dw1", "dw2"] + ["db1", "db2"] * bias + ["dlogits"]
    for name, o, r in zip(names, out, ref, strict=True):
        assert o.shape == r.shape and o.dtype == r.dtype, name
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5, msg=name)
    assert out[1].abs().sum() > 0 and out[-1].abs().sum() > 0  # gradients actually flowed


def test_empty_expert_gets_zero_weight_gradient() -> None:
    x, w1, w2, _, _, logits = _tensors(4, 3, 16, 8, "swiglu", torch.float32, False, False)
    experts = torch.tensor([[0], [2], [0], [2]])  # expert 1 receives nothing
    out = _grads(triton_experts, x, w1, w2, None, None, logits, 1, None, "swiglu", experts)
    ref = _grads(torch_experts, x, w1, w2, None, None, logits, 1, None, "swiglu", experts)
    assert torch.equal(out[2][1], torch.zeros_like(out[2][1]))  # dw1 of the empty expert
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


def test_float16_forward_close_to_float32() -> None:
    x, w1, w2, _, _, logits = _tensors(5, 4, 16, 16, "swiglu", torch.float32, False, False)
    weights, experts = torch.softmax(logits, -1).topk(2, -1)
    plan = make_plan(experts, weights, weights, 4)
    y32 = torch_experts(x, plan, w1, w2, None, None, "swiglu")
    y16 = triton_experts(x.half(), plan, w1.half(), w2.half(), None, None, "swiglu")
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16.float(), y32, rtol=2e-2, atol=2e-2)


def test_schedule_matches_a_loop() -> None:
    counts = [0, 37, 5, 0, 16, 1]
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    S = int(offsets[-1]) + 7  # trailing dropped slots
    expert_M, row_M = schedule(offsets, S, 16)
    want = [(e, int(offsets[e]) + r) for e, c in enumerate(counts) for r in range(0, c, 16)]
    n = len(want)
    assert [(int(e), int(r)) for e, r in zip(expert_M[:n], row_M[:n], strict=True)] == want
    assert (expert_M[n:] == len(counts)).all()  # the rest of the static grid returns early


def test_no_tokens_gives_empty_output() -> None:
    x, w1, w2, _, _, _ = _tensors(1, 2, 8, 8, "relu", torch.float32, False, False)
    empty = torch.zeros(0, 1, dtype=torch.long)
    plan = make_plan(empty, torch.zeros(0, 1), torch.zeros(0, 1), 2)
    assert triton_experts(x[:0], plan, w1, w2, None, None, "relu").shape == (0, 8)


def test_supported_reasons() -> None:
    backend = TritonBackend()
    assert backend.supported(torch.device("cpu"), torch.float32)  # interpreter
    assert "dtype" in backend.unsupported(torch.device("cpu"), torch.int32)


def test_layer_matches_reference() -> None:
    cfg = MoEConfig(d_model=16, d_hidden=8, n_experts=4, k=2, capacity_factor=1.0, backend="triton")
    torch.manual_seed(0)
    moe = MoE(cfg).eval()
    x = torch.randn(2, 3, 16)
    y, info = moe(x)
    y_ref, info_ref = reference.moe_forward(moe, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(info.routing.experts, info_ref.routing.experts)


def _per_slot_grads(fn, x, w1, w2, b1, b2, offsets, activation):
    """Per-slot outputs and d(x_SD, w1, w2, b1, b2) through one backend, on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w1, w2)]
    biases = [t.detach().clone().requires_grad_() if t is not None else None for t in (b1, b2)]
    out = fn(leaves[0], offsets, leaves[1], leaves[2], biases[0], biases[1], activation)
    n = int(offsets[-1])  # kept rows; the torch backend returns only those
    g = torch.Generator().manual_seed(2)
    dout = torch.randn(x.shape[0], w2.shape[-1], generator=g, dtype=out.dtype)[: out.shape[0]]
    params = leaves + [b for b in biases if b is not None]
    grads = torch.autograd.grad(out, params, dout)
    assert out.shape[0] in (n, x.shape[0]) and torch.equal(out[n:], torch.zeros_like(out[n:]))
    assert torch.equal(grads[0][n:], torch.zeros_like(grads[0][n:]))  # no gradient past them
    return [out[:n], grads[0][:n], *grads[1:]]


@pytest.mark.parametrize(("T", "E", "K", "D", "H", "activation", "bias", "capacity", "tr"), CASES)
def test_per_slot_matches_torch_backend(T, E, K, D, H, activation, bias, capacity, tr) -> None:
    x, w1, w2, b1, b2, logits = _tensors(T, E, D, H, activation, torch.float32, bias, tr)
    weights, experts = torch.softmax(logits, -1).topk(K, -1)
    plan = make_plan(experts, weights, weights, E, capacity)
    x_SD = x[plan.token_S]
    args = (x_SD, w1, w2, b1, b2, plan.offsets_E1, activation)
    ref = _per_slot_grads(torch_per_slot, *args)
    out = _per_slot_grads(triton_per_slot, *args)
    names = ["out", "dx_SD", "dw1", "dw2"] + ["db1", "db2"] * bias
    for name, o, r in zip(names, out, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5, msg=name)
    assert out[1].abs().sum() > 0  # gradients actually flowed


def test_per_slot_then_combine_matches_fused() -> None:
    x, w1, w2, b1, b2, logits = _tensors(7, 4, 16, 8, "swiglu", torch.float32, True, False)
    weights, experts = torch.softmax(logits, -1).topk(2, -1)
    plan = make_plan(experts, weights, weights, 4, 3)  # capacity 3: some slots dropped
    out_SD = triton_per_slot(x[plan.token_S], plan.offsets_E1, w1, w2, b1, b2, "swiglu")
    y = combine_rows(out_SD, plan.token_S, plan.weight_S, 7)
    y_fused = triton_experts(x, plan, w1, w2, b1, b2, "swiglu")
    torch.testing.assert_close(y, y_fused, rtol=1e-6, atol=1e-6)


def test_launchers_name_the_bad_operand() -> None:
    x, w1, w2, _, _, _ = _tensors(4, 2, 16, 8, "relu", torch.float32, False, False)
    tiles = Tiles(torch.tensor([0, 2, 4]), 16)
    cfg = INTERPRETER["up"]
    with pytest.raises(ValueError, match=r"^x must have shape \(\*, 16\)"):
        gemm_up(x[:, :8], w1, None, tiles, cfg, "relu")
    with pytest.raises(ValueError, match="^token_S must be contiguous"):
        gemm_up(x, w1, None, tiles, cfg, "relu", token_S=torch.arange(8)[::2])
    with pytest.raises(ValueError, match=r"^b2 must have shape \(2, 16\)"):
        gemm_down(x[:, :8], w2, torch.zeros(2, 8), tiles, cfg)
    with pytest.raises(ValueError, match="^offsets_E1 must have dtype"):
        gemm_dx(x[:, :8], w1, Tiles(torch.tensor([0.0, 2.0, 4.0]), 16), cfg)


def test_ops_and_their_fakes_agree() -> None:
    """torch.library.opcheck: each op's schema and fake (torch.compile, CUDA graphs) hold."""
    x, w1, w2, b1, b2, logits = _tensors(5, 3, 16, 8, "swiglu", torch.float32, True, False)
    weights, experts = torch.softmax(logits, -1).topk(2, -1)
    plan = make_plan(experts, weights, weights, 3)
    S, off, key = plan.token_S.shape[0], plan.offsets_E1, "interpreter"
    expert_M, row_M = schedule(off, S, 16)
    x_SD = x[plan.token_S]
    up_fused = (x, plan.token_S, plan.order_S, w1, b1, None, None, off, "swiglu", 16, key, True)
    up_slots = (x_SD, None, None, w1, b1, expert_M, row_M, off, "swiglu", 16, key, True)
    h1, a, inv = up(*up_fused)
    out = down(a, w2, b2, expert_M, row_M, off, 16, key, False)
    grads = (plan.token_S, plan.weight_S, inv, plan.kept_TK, off, w1, w2, b1, b2, "swiglu", key)
    cases = [
        (schedule, (off, S, 16)),
        (up, up_fused),
        (up, up_slots),
        (down, (a, w2, b2, expert_M, row_M, off, 16, key, True)),
        (combine_op, (out, inv, plan.weight_S, plan.kept_TK, 5)),
        (backward, (torch.randn(5, 16), x, h1.clone(), *grads)),
        (backward_per_slot, (torch.randn(S, 16), x_SD, h1.clone(), *grads[4:])),
    ]
    for op, args in cases:
        torch.library.opcheck(op.custom, args, test_utils=("test_schema", "test_faketensor"))
