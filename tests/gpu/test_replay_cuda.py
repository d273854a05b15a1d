"""Small inference batches replayed from CUDA graphs equal the eager layer, and stay put."""

import pytest
import torch

import moekit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _pair(router="topk", backend="triton", n_shared=0):
    torch.manual_seed(0)
    cfg = moekit.MoEConfig(
        d_model=128, d_hidden=64, n_experts=16, k=4, backend=backend,
        n_shared_experts=n_shared, router={"kind": router},
    )  # fmt: skip
    moe = moekit.MoE(cfg).cuda().to(torch.bfloat16).eval()
    eager = moekit.MoE(moekit.MoEConfig(**{**cfg.to_dict(), "graph_max_tokens": 0}))
    eager.load_state_dict(moe.state_dict())
    return moe, eager.cuda().to(torch.bfloat16).eval()


@pytest.mark.parametrize("backend", ["triton", "grouped_mm"])
@pytest.mark.parametrize("router, n_shared", [("topk", 0), ("sigmoid", 1)])
@pytest.mark.parametrize("T", [1, 3, 16, 64])
def test_replay_equals_eager(backend, router, n_shared, T):
    moe, eager = _pair(router, backend, n_shared)
    x = torch.randn(T, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y, info = moe(x)
        y_ref, ref = eager(x)
    assert moe.replay._entries, "the call did not replay"
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    assert torch.equal(info.routing.experts, ref.routing.experts)
    torch.testing.assert_close(info.routing.weights, ref.routing.weights)
    torch.testing.assert_close(info.aux_loss, ref.aux_loss)
    torch.testing.assert_close(info.metrics["expert_load"], ref.metrics["expert_load"])


def test_results_held_across_calls_do_not_change_and_inference_mode_works():
    moe, _ = _pair()
    a, b = (torch.randn(2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    with torch.inference_mode():
        y_a, info_a = moe(a)
        keep = y_a.clone(), info_a.routing.experts.clone()
        moe(b)
    assert torch.equal(y_a, keep[0]) and torch.equal(info_a.routing.experts, keep[1])


def test_training_and_grad_mode_run_eagerly():
    moe, _ = _pair()
    x = torch.randn(2, 128, device="cuda", dtype=torch.bfloat16)
    moe(x)[0].float().sum().backward()
    assert not moe.replay._entries and moe.experts.w1.grad is not None


def test_updated_weights_are_seen_and_moved_weights_recaptured():
    moe, eager = _pair()
    x = torch.randn(4, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        moe(x)
        for p, q in zip(moe.parameters(), eager.parameters(), strict=True):
            p.mul_(0.5)
            q.mul_(0.5)
        torch.testing.assert_close(moe(x)[0], eager(x)[0], rtol=2e-2, atol=2e-2)
        moe.float()
        eager.float()
        x32 = x.float()
        torch.testing.assert_close(moe(x32)[0], eager(x32)[0], rtol=1e-3, atol=1e-3)
    assert len(moe.replay._entries) == 2


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_hf_experts_replay_equals_eager(family):
    pytest.importorskip("transformers")
    from tests.integrations.hf_models import VOCAB, hf_model

    from moekit.integrations.hf.experts import _BOUND, register

    register()
    model = hf_model(family).cuda().eval()
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        model.set_experts_implementation("eager")
        want = model(x).logits
        model.set_experts_implementation("moekit")
        got = model(x).logits
    experts = model.model.layers[0].mlp.experts
    assert _BOUND[id(experts)][1][("replay", "auto")]._entries, "the call did not replay"
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_a_failed_capture_leaves_random_ops_working():
    """A capture that fails (here: a host sync inside it) falls back to eager without leaving
    the CUDA generator in capture: later random ops, eager and captured, still run."""
    from moekit.replay import capture

    x = torch.randn(8, device="cuda")
    with pytest.raises(RuntimeError):
        capture(lambda: x.sum().item(), x.device)
    torch.randn(4, device="cuda")  # failed with "Offset increment outside graph capture"
    graph, out = capture(lambda: torch.rand(4, device="cuda") + x[:4], x.device)
    graph.replay()
    assert out.shape == (4,) and bool(torch.isfinite(out).all())
