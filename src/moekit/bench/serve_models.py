"""Models of the serving benchmark: random-init shapes, and their weights as a transformers model.

`qwen3-moe` has the layer dimensions of Qwen3-30B-A3B (d_model 2048, 128 experts of width 768,
top-8, 32 query / 4 key-value heads of 128, per-head q/k RMSNorm, vocabulary 151936) with
fewer layers, so the model fits one GPU: 6 layers are 4.4B parameters (8.7 GB in bf16).

`export_transformers` writes the same weights as a Hugging Face checkpoint of the matching
family (Qwen3-MoE here, Mixtral for `small`) with `moekit.integrations.hf.moekit_to_hf`, and
`load_transformers` reads it with transformers' own loader, so the benchmark compares
engines, not weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moekit.config import ExpertConfig, MoEConfig, RouterConfig
from moekit.model import ModelConfig, Transformer, save_model_files

SHAPES = ("small", "qwen3-moe")


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
        head_size=128,
        qk_norm="head",  # Qwen3: RMSNorm of each head's queries and keys
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


def export_transformers(ckpt: str | Path, out: str | Path) -> Path:
    """The checkpoint as a Hugging Face one (`moekit_to_hf`), written once: reused if there."""
    from moekit.integrations.hf import moekit_to_hf

    out = Path(out)
    if not (out / "config.json").exists():
        moekit_to_hf(ckpt, out)
    return out


def load_transformers(hf_dir: str | Path, device: torch.device, dtype: torch.dtype) -> Any:
    """The exported model in transformers (eval mode), with no special token to stop on."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).to(device).eval()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # random weights
        setattr(hf.generation_config, name, None)
    return hf
