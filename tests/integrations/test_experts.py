"""experts_implementation="moekit" gives transformers' eager logits and parameter gradients."""

import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import transformers  # noqa: E402
from tests.integrations.hf_models import VOCAB, hf_model, save_hf  # noqa: E402
from transformers.integrations.moe import use_experts_implementation  # noqa: E402

from moekit.integrations.hf.experts import _weights, register  # noqa: E402

ROUTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


@pytest.fixture(scope="module", autouse=True)
def registered():
    return register()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def logits_and_grads(model, x: torch.Tensor, implementation: str):
    model.set_experts_implementation(implementation)
    model.zero_grad()
    out = model(x).logits
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ROUTED)
def test_moekit_experts_match_eager_logits_and_every_gradient(family):
    model = hf_model(family)
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    want, want_grads = logits_and_grads(model, x, "eager")
    got, got_grads = logits_and_grads(model, x, "moekit")
    assert rel_err(got, want) < 1e-5
    experts = [n for n in want_grads if "experts.gate_up_proj" in n]
    assert experts and sorted(got_grads) == sorted(want_grads)
    for name, grad in want_grads.items():
        assert rel_err(got_grads[name], grad) < 1e-5, name


def test_from_pretrained_takes_the_name_and_weights_are_views(tmp_path):
    save_hf(hf_model("qwen3_moe"), tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, experts_implementation="moekit"
    )
    experts = model.model.layers[0].mlp.experts
    assert model.config._experts_implementation == "moekit"
    w1, w2, _, _ = _weights(experts).tensors
    assert w1.data_ptr() == experts.gate_up_proj.data_ptr() and w1.shape == (4, 16, 16)
    assert w2.data_ptr() == experts.down_proj.data_ptr() and w2.shape == (4, 8, 16)


def test_a_custom_gate_is_refused_by_name():
    model = hf_model("gpt_oss")
    model.set_experts_implementation("moekit")
    with pytest.raises(ValueError, match=r"GptOssExperts\._apply_gate"):
        model(torch.zeros(1, 3, dtype=torch.long))


def _experts_class(**flags):
    """A bare experts module under transformers' decorator, with its flags."""

    @use_experts_implementation(**flags)
    class Experts(nn.Module):
        def __init__(self, config):
            super().__init__()
            E, D, H = 4, 8, 6
            self.num_experts = E
            gate = flags.get("has_gate", True)
            out = 2 * H if gate else H
            shape = (E, D, out) if flags.get("is_transposed") else (E, out, D)
            down = (E, H, D) if flags.get("is_transposed") else (E, D, H)
            self.register_parameter(
                "gate_up_proj" if gate else "up_proj", nn.Parameter(torch.randn(shape))
            )
            self.down_proj = nn.Parameter(torch.randn(down))
            if flags.get("has_bias"):
                name = "gate_up_proj_bias" if gate else "up_proj_bias"
                self.register_parameter(name, nn.Parameter(torch.randn(E, out)))
                self.down_proj_bias = nn.Parameter(torch.randn(E, D))
            self.act_fn = nn.GELU() if gate else nn.ReLU()

    return Experts


@pytest.mark.parametrize(
    "flags",
    [{"is_transposed": True, "has_bias": True}, {"has_gate": False}, {"has_bias": True}],
    ids=["transposed-bias", "no-gate", "bias"],
)
def test_module_flags_are_honoured(flags):
    torch.manual_seed(1)
    experts = _experts_class(**flags)(SimpleNamespace(_experts_implementation="batched_mm"))
    x = torch.randn(7, 8, requires_grad=True)
    index = torch.randint(0, 4, (7, 2))
    weights = torch.rand(7, 2, requires_grad=True)
    results = []
    for name in ("batched_mm", "moekit"):
        experts.config._experts_implementation = name
        experts.zero_grad()
        x.grad = weights.grad = None
        y = experts(x, index, weights)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append([y, x.grad, weights.grad, *(p.grad for p in experts.parameters())])
    for got, want in zip(results[1], results[0], strict=True):
        assert rel_err(got, want) < 1e-5


def test_interleaved_gate_up_and_post_norms_are_refused():
    cfg = SimpleNamespace(_experts_implementation="moekit")
    x, index, weights = torch.randn(3, 8), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"Experts\.is_concatenated is False"):
        _experts_class(is_concatenated=False)(cfg)(x, index, weights)
    with pytest.raises(ValueError, match=r"Experts\.has_post_expert_norm is True"):
        _experts_class(has_post_expert_norm=True)(cfg)(x, index, weights)


def test_dense_router_scores_read_each_slots_expert():
    torch.manual_seed(2)
    cfg = SimpleNamespace(_experts_implementation="moekit")
    experts = _experts_class()(cfg)
    x, index = torch.randn(5, 8), torch.randint(0, 4, (5, 2))
    scores = torch.rand(5, 4)
    dense = experts(x, index, scores)
    assert torch.allclose(dense, experts(x, index, scores.gather(1, index)))


@pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="the triton backend needs CUDA or TRITON_INTERPRET=1",
)
def test_triton_backend_reads_hf_weights_through_their_strides():
    pytest.importorskip("triton")
    register(backend="triton", name="moekit-triton")
    torch.manual_seed(3)
    experts = _experts_class(has_bias=True)(SimpleNamespace(_experts_implementation="batched_mm"))
    x, index = torch.randn(6, 8), torch.randint(0, 4, (6, 2))
    weights = torch.rand(6, 2, requires_grad=True)
    grads = []
    for name in ("batched_mm", "moekit-triton"):
        experts.config._experts_implementation = name
        experts.zero_grad()
        weights.grad = None
        y = experts(x, index, weights)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads.append([y, weights.grad, *(p.grad for p in experts.parameters())])
    assert not experts.gate_up_proj.mT.is_contiguous()  # the layout the backend was handed
    for got, want in zip(grads[1], grads[0], strict=True):
        assert rel_err(got, want) < 1e-5


def test_a_module_is_checked_once_and_again_when_its_act_fn_changes(monkeypatch):
    import moekit.integrations.hf.experts as adapter

    checks = []
    real = adapter._activation
    monkeypatch.setattr(adapter, "_activation", lambda m: checks.append(m) or real(m))
    experts = _experts_class()(SimpleNamespace(_experts_implementation="moekit"))
    x, index, weights = torch.randn(3, 8), torch.randint(0, 4, (3, 2)), torch.rand(3, 2)
    with torch.no_grad():
        first = experts(x, index, weights)
        assert torch.equal(experts(x, index, weights), first) and len(checks) == 1
        experts.act_fn = nn.Tanh()
        with pytest.raises(ValueError, match=r"Experts\.act_fn = Tanh\(\)"):
            experts(x, index, weights)


def test_moved_and_updated_weights_are_read_on_the_next_call():
    torch.manual_seed(4)
    experts = _experts_class()(SimpleNamespace(_experts_implementation="moekit"))
    index = torch.randint(0, 4, (5, 2))

    def both(x, weights):
        outs = []
        for name in ("moekit", "batched_mm"):
            experts.config._experts_implementation = name
            outs.append(experts(x, index, weights))
        return outs

    with torch.no_grad():
        x, weights = torch.randn(5, 8), torch.rand(5, 2)
        before, _ = both(x, weights)
        experts.gate_up_proj.mul_(2.0)
        got, want = both(x, weights)
        assert not torch.equal(got, before) and rel_err(got, want) < 1e-6
        experts.to(torch.float64)  # param.data swapped for new memory
        got, want = both(x.double(), weights.double())
        assert got.dtype == torch.float64 and rel_err(got, want) < 1e-12
