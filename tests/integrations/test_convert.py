"""HF MoE checkpoints into moekit and back: same logits, same greedy tokens, exact round trips."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tests.integrations.hf_models import CONVERTIBLE, VOCAB, hf_model, save_hf  # noqa: E402

import moekit  # noqa: E402
from moekit.integrations.hf import (  # noqa: E402
    UnsupportedCheckpoint,
    hf_to_moekit,
    load_hf,
    load_tokenizer,
    moekit_to_hf,
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("family", CONVERTIBLE)
def test_imported_model_gives_transformers_logits_and_greedy_tokens(family, tmp_path):
    hf = hf_model(family)
    save_hf(hf, tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(ours(x).out, hf(x).logits) < 1e-5
    want = hf.generate(x, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(ours.generate(x, 6, temperature=0.0), want)


@pytest.mark.parametrize("family", CONVERTIBLE)
def test_hf_to_moekit_to_hf_is_exact(family, tmp_path):
    save_hf(hf_model(family, seed=2), tmp_path / "hf")
    hf_to_moekit(tmp_path / "hf", tmp_path / "moekit")
    moekit_to_hf(tmp_path / "moekit", tmp_path / "back")
    before = load_file(tmp_path / "hf" / "model.safetensors")
    after = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    x = torch.arange(12)[None] % VOCAB
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)
    assert (tmp_path / "back" / "tokenizer.json").is_file()


def test_k1_mixtral_weighs_its_expert_one(tmp_path):
    hf = hf_model("mixtral", num_experts_per_tok=1)
    save_hf(hf, tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    assert ours.cfg.moe.router.renormalize and ours.cfg.moe.k == 1
    x = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = ours(x)
        assert rel_err(out.out, hf(x).logits) < 1e-5
    assert torch.equal(out.layers[0].routing.weights, torch.ones(10, 1))


def test_sharded_bf16_checkpoint_keeps_its_dtype_and_weights(tmp_path):
    hf = hf_model("qwen3_moe", dtype=torch.bfloat16)
    save_hf(hf, tmp_path / "hf", max_shard_size="4KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    hf_to_moekit(tmp_path / "hf", tmp_path / "moekit")
    saved = load_file(tmp_path / "moekit" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    moekit_to_hf(tmp_path / "moekit", tmp_path / "back", max_shard_bytes=4_000)
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    want = hf.state_dict()
    assert all(torch.equal(p, want[n]) for n, p in back.state_dict().items())


def test_fused_transformers5_layout_reads_the_same(tmp_path):
    hf = hf_model("olmoe", seed=4)
    save_hf(hf, tmp_path / "legacy")
    fused = tmp_path / "fused"
    hf.config.save_pretrained(fused)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, fused / "model.safetensors")
    a, b = load_hf(tmp_path / "legacy"), load_hf(fused)
    assert all(torch.equal(p, b.state_dict()[n]) for n, p in a.state_dict().items())


def test_a_native_moekit_model_exports_with_equal_logits(tmp_cfg_model, tmp_path):
    model = tmp_cfg_model
    moekit_to_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    x = torch.randint(0, 37, (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert rel_err(model(x).out, hf(x).logits) < 1e-5


@pytest.fixture
def tmp_cfg_model(tiny_model):
    """The tests' tiny model in a shape Qwen3-MoE holds: per-head q/k norm, no shared expert."""
    moe = moekit.MoEConfig(d_model=32, d_hidden=24, n_experts=4, k=2)
    torch.manual_seed(0)
    model = tiny_model(qk_norm="head", head_size=16, moe=moe, init_std=0.2).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def test_unmappable_architectures_and_model_types_are_refused_by_name(tiny_model, tmp_path):
    with pytest.raises(UnsupportedCheckpoint, match="capacity_factor=1.0"):
        moe = moekit.MoEConfig(d_model=32, d_hidden=24, n_experts=4, k=2, capacity_factor=1.0)
        moekit_to_hf(tiny_model(moe=moe), tmp_path / "a")
    with pytest.raises(UnsupportedCheckpoint, match="n_shared_experts without shared_gate"):
        moekit_to_hf(tiny_model(), tmp_path / "b")
    with pytest.raises(UnsupportedCheckpoint, match="renormalize=False"):
        router = moekit.RouterConfig(renormalize=False)
        moe = moekit.MoEConfig(d_model=32, d_hidden=24, n_experts=4, k=2, router=router)
        moekit_to_hf(tiny_model(moe=moe, moe_every=1), tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
    save_hf(hf_model("deepseek_v3"), tmp_path / "ds")
    with pytest.raises(UnsupportedCheckpoint, match="model_type='deepseek_v3' is not supported"):
        load_hf(tmp_path / "ds")


def test_tokenizer_travels_with_the_checkpoint(tmp_path):
    save_hf(hf_model("mixtral"), tmp_path / "hf")
    hf_to_moekit(tmp_path / "hf", tmp_path / "moekit")
    tokenizer = load_tokenizer(tmp_path / "moekit")
    ids = tokenizer.encode("the router gate")
    assert ids == [1, 4, 9] and tokenizer.decode(ids) == "the router gate"
    assert load_tokenizer(tmp_path) is None
    assert moekit.load(tmp_path / "moekit").cfg.moe.n_experts == 4
