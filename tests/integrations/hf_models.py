"""Tiny random Hugging Face MoE models built in the test, saved with save_pretrained; no downloads.

Every family gets two layers, four experts and widths of a few dozen; weights are redrawn
with std 0.2 so routing and logits are decisive (HF's own init leaves routers near uniform).
A word-level tokenizer is built with the `tokenizers` library and saved beside the weights.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402

WORDS = ["the", "a", "expert", "router", "token", "layer", "model", "weight", "gate", "up"]
VOCAB = 48
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
FAMILIES = {
    "mixtral": dict(num_local_experts=4, intermediate_size=12),
    "qwen2_moe": dict(
        num_experts=4,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=16,
        intermediate_size=24,
        decoder_sparse_step=2,  # layer 0 dense, layer 1 MoE
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(
        num_experts=4,
        moe_intermediate_size=8,
        intermediate_size=24,
        head_dim=8,
        norm_topk_prob=True,
    ),
    "olmoe": dict(num_experts=4, intermediate_size=12, norm_topk_prob=False),
    "deepseek_v3": dict(
        n_routed_experts=4,
        n_shared_experts=1,
        moe_intermediate_size=8,
        intermediate_size=24,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        kv_lora_rank=8,
        q_lora_rank=None,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=4,
        num_key_value_heads=4,
        routed_scaling_factor=2.5,
    ),
    "gpt_oss": dict(num_local_experts=4, intermediate_size=8, head_dim=4, sliding_window=8),
}
CONVERTIBLE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def hf_config(family: str, **overrides):
    return transformers.AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **overrides})


def hf_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random HF causal LM of `family` in eval mode, with decisive weights."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(std=0.2)
    return model.to(dtype).eval()


def word_tokenizer():
    """A word-level `tokenizers.Tokenizer` over WORDS, ids below VOCAB."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def save_hf(model, directory: Path, **kwargs) -> Path:
    """save_pretrained plus the word-level tokenizer; returns the directory."""
    model.save_pretrained(str(directory), **kwargs)
    word_tokenizer().save(str(directory / "tokenizer.json"))
    return directory
