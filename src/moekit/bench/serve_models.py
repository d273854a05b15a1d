"""Models of the serving benchmark: random-init shapes, and their weights as a transformers model.

`qwen3-moe` has the layer dimensions of Qwen3-30B-A3B (d_model 2048, 128 experts of width 768,
top-8, 32 query / 4 key-value heads of 128, per-head q/k RMSNorm, vocabulary 151936) with
fewer layers, so the model fits one GPU: 6 layers are 4.4B parameters (8.7 GB in bf16).
Where this moekit lacks per-head q/k norms or a free head size, the shape keeps head size
d_model / heads and no q/k norm, and the transformers twin is a Mixtral instead of a Qwen3-MoE.

`to_transformers` builds the transformers model that computes what the moekit model computes,
from the same tensors, so the benchmark compares engines, not weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.config import ExpertConfig, MoEConfig, RouterConfig
from moekit.model import ModelConfig, Transformer, save_model_files

SHAPES = ("small", "qwen3-moe")


def _has(field: str) -> bool:
    return field in {f.name for f in dataclasses.fields(ModelConfig)}


def shape_config(shape: str, layers: int, max_seq_len: int) -> ModelConfig:
    """A model config by shape name: 'small' (byte-level, 13.5M) or 'qwen3-moe'."""
    if shape == "small":
        moe = MoEConfig(d_model=256, d_hidden=512, n_experts=8, k=2)
        return ModelConfig(
            vocab_size=256,
            d_model=256,
            n_layers=layers,
            n_heads=4,
            n_kv_heads=2,
            max_seq_len=max_seq_len,
            moe=moe,
        )
    if shape != "qwen3-moe":
        raise ValueError(f"shape={shape!r} is not one of {SHAPES}")
    moe = MoEConfig(
        d_model=2048,
        d_hidden=768,
        n_experts=128,
        k=8,
        router=RouterConfig(kind="topk", renormalize=True),
        expert=ExpertConfig(activation="swiglu"),
    )
    extra: dict[str, Any] = {}
    if _has("head_size") and _has("qk_norm"):  # Qwen3's own attention
        extra = {"head_size": 128, "qk_norm": "head"}
    return ModelConfig(
        vocab_size=151936,
        d_model=2048,
        n_layers=layers,
        n_heads=32,
        n_kv_heads=4,
        max_seq_len=max_seq_len,
        norm_eps=1e-6,
        rope_theta=1e6,
        moe=moe,
        **extra,
    )


def random_checkpoint(
    path: str | Path,
    shape: str = "small",
    layers: int = 4,
    max_seq_len: int = 512,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> Path:
    """Write a random-init model of `shape` to `path` (built on `device`, saved in `dtype`)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(shape_config(shape, layers, max_seq_len))
    model = model.to("cpu", dtype)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_model_files(model, path)
    return path


def _hf_config(cfg: ModelConfig) -> Any:
    """transformers config of a moekit model: Qwen3-MoE with per-head q/k norms, else Mixtral."""
    import transformers

    moe = cfg.moe
    qk = getattr(cfg, "qk_norm", "none")
    if qk not in ("none", "head") or moe.n_shared_experts or cfg.moe_every != 1:
        raise ValueError("only per-head or no q/k norm, no shared experts, MoE in every layer")
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        num_experts_per_tok=moe.k,
        bos_token_id=None,  # random weights: no special tokens, so generation never stops early
        eos_token_id=None,
        pad_token_id=None,
    )
    if qk == "head":
        hf = transformers.Qwen3MoeConfig(
            **common,
            num_experts=moe.n_experts,
            moe_intermediate_size=moe.d_hidden,
            intermediate_size=moe.d_hidden,
            norm_topk_prob=moe.router.renormalize,
        )
    else:
        if not moe.router.renormalize:
            raise ValueError("Mixtral renormalizes the top-k weights: router.renormalize=True")
        hf = transformers.MixtralConfig(
            **common, num_local_experts=moe.n_experts, intermediate_size=moe.d_hidden
        )
    hf.head_dim = cfg.head_dim  # older configs take it only as an attribute
    return hf


def hf_state_dict(model: Transformer) -> dict[str, Tensor]:
    """moekit weights under transformers' names and layouts (experts [E, out, in])."""
    cfg, sd = model.cfg, model.state_dict()
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = {
        "model.embed_tokens.weight": sd["embed.weight"],
        "model.norm.weight": sd["norm.weight"],
        "lm_head.weight": sd["head.weight"],
    }
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        wq, wk, wv = sd[src + "attn.qkv.weight"].split([q, kv, kv])
        out |= {
            dst + "input_layernorm.weight": sd[src + "norm1.weight"],
            dst + "post_attention_layernorm.weight": sd[src + "norm2.weight"],
            dst + "self_attn.q_proj.weight": wq,
            dst + "self_attn.k_proj.weight": wk,
            dst + "self_attn.v_proj.weight": wv,
            dst + "self_attn.o_proj.weight": sd[src + "attn.proj.weight"],
            dst + "mlp.gate.weight": sd[src + "ffn.router.weight"],
            dst + "mlp.experts.gate_up_proj": sd[src + "ffn.experts.w1"].transpose(1, 2),
            dst + "mlp.experts.down_proj": sd[src + "ffn.experts.w2"].transpose(1, 2),
        }
        for name in ("q_norm", "k_norm"):
            if src + f"attn.{name}.weight" in sd:
                out[dst + f"self_attn.{name}.weight"] = sd[src + f"attn.{name}.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def to_transformers(model: Transformer, **config: Any) -> Any:
    """A transformers causal LM holding `model`'s weights (same device and dtype).

    `config` sets transformers config attributes (e.g. experts_implementation).
    """
    import transformers

    hf_cfg = _hf_config(model.cfg)
    for key, value in config.items():
        setattr(hf_cfg, key, value)
    p = next(model.parameters())
    cls = (
        transformers.Qwen3MoeForCausalLM
        if hf_cfg.model_type == "qwen3_moe"
        else transformers.MixtralForCausalLM
    )
    with torch.device(p.device):
        hf = cls._from_config(hf_cfg, dtype=p.dtype)
    hf.load_state_dict(hf_state_dict(model), strict=True)
    return hf.eval()
