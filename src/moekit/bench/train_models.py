"""The models `moekit bench train` times: real-size shapes, built as moekit and as Hugging Face.

A `TrainShape` is the dims of a published MoE with a chosen number of layers. moekit builds it
as a `Transformer`; transformers builds the same shape as the family's own model class (random
init, `experts_implementation` as given), from the config `moekit.integrations.hf` writes, so
both have the same parameters and FLOPs per token. `moekit_step` and `hf_step` build one
optimiser step of each, the loop its users write.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from moekit.config import ExpertConfig, MoEConfig, RouterConfig
from moekit.model import ModelConfig, Transformer
from moekit.train.config import TrainConfig
from moekit.train.metrics import model_loss
from moekit.train.optim import build_optimizer
from moekit.train.recompute import checkpoint_activations
from moekit.train.step import Precision, StepConfig, TrainStep

Step = Callable[[], None]  # one optimiser step


@dataclass(frozen=True)
class TrainShape:
    """Dims of one model: attention, experts, vocabulary, and its Hugging Face family."""

    name: str
    family: str  # transformers model_type of the same architecture
    vocab: int
    d_model: int
    layers: int  # default; `moekit bench train --layers` overrides it
    heads: int
    kv_heads: int
    head_dim: int
    qk_norm: str  # "head" (Qwen3) or "none" (Mixtral)
    experts: int
    k: int
    hidden: int  # per-expert hidden size
    rope_theta: float = 1e6

    def model_config(self, layers: int, seq_len: int, backend: str) -> ModelConfig:
        """The moekit config of this shape: every layer MoE, SwiGLU experts, top-k renormalised."""
        moe = MoEConfig(
            d_model=self.d_model,
            d_hidden=self.hidden,
            n_experts=self.experts,
            k=self.k,
            router=RouterConfig(renormalize=True, load_balance_weight=0.001, z_loss_weight=0.0),
            expert=ExpertConfig(activation="swiglu"),
            backend=backend,
        )
        return ModelConfig(
            vocab_size=self.vocab,
            d_model=self.d_model,
            n_layers=layers,
            n_heads=self.heads,
            n_kv_heads=self.kv_heads,
            head_size=self.head_dim,
            qk_norm=self.qk_norm,
            max_seq_len=seq_len,
            norm_eps=1e-6,
            rope_theta=self.rope_theta,
            d_ff=self.hidden,  # unused: every layer is MoE
            moe=moe,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SHAPES = {
    s.name: s
    for s in (
        # Qwen3-30B-A3B: 48 layers in the release; 8 with fp32 weights + AdamW fit one H200
        TrainShape("qwen3-30b-a3b", "qwen3_moe", 151936, 2048, 8, 32, 4, 128, "head", 128, 8, 768),
        # Mixtral-8x7B: a 2-layer slice of its 32
        TrainShape("mixtral-2l", "mixtral", 32000, 4096, 2, 32, 8, 128, "none", 8, 2, 14336),
        # the harness itself, on a CPU
        TrainShape("tiny", "qwen3_moe", 256, 64, 2, 4, 2, 16, "head", 8, 2, 32, 1e4),
    )
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active matmul weights + 12 x layers x q width x seq_len.

    The PaLM count (Chowdhery et al. 2022, appendix B), as torchtitan reports MFU: routed
    experts count k of E, the router and the LM head count, the embedding lookup does not, and
    attention is counted without the causal half.
    """
    D, q = cfg.d_model, cfg.n_heads * cfg.head_dim
    kv = cfg.kv_heads * cfg.head_dim
    weights = 0
    for i in range(cfg.n_layers):
        weights += D * (q + 2 * kv) + q * D  # qkv and output projections
        if cfg.is_moe_layer(i):
            m = cfg.moe
            h1 = 2 * m.d_hidden if m.expert.gated else m.d_hidden
            weights += D * m.n_experts  # router
            weights += (m.k + m.n_shared_experts) * (D * h1 + m.d_hidden * D)
        else:
            h1 = 2 * cfg.d_ff if cfg.activation in ("swiglu", "geglu", "reglu") else cfg.d_ff
            weights += D * h1 + cfg.d_ff * D
    weights += D * cfg.out_dim  # LM head
    return 6.0 * weights + 12.0 * cfg.n_layers * q * seq_len


def moekit_model(cfg: ModelConfig, device: torch.device) -> Transformer:
    """The moekit model of `cfg`, initialised on `device` in float32 (the master weights)."""
    with torch.device(device):
        return Transformer(cfg)


def hf_model(cfg: ModelConfig, family: str, experts: str, device: torch.device) -> nn.Module:
    """The same shape as transformers' `family` class, randomly initialised on `device`.

    `experts` is transformers' `experts_implementation` ("grouped_mm", "eager", or "moekit",
    which registers moekit's backends there first). The router's load-balancing loss is on
    (`output_router_logits`), as it is for training.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from moekit.integrations.hf.families import FAMILIES

    if experts == "moekit":
        from moekit.integrations.hf.experts import register

        register("auto")
    config = AutoConfig.for_model(family, **FAMILIES[family].hf_config(cfg))
    config.output_router_logits = True
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation="sdpa", experts_implementation=experts
        )
    return model.float()


def _tokens(cfg: ModelConfig, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=gen).to(device)


def moekit_step(
    cfg: ModelConfig, device: torch.device, batch: int, seq_len: int, mode: str, compiled: bool
) -> Step:
    """One moekit optimiser step on fixed random tokens: the trainer's TrainStep and AdamW."""
    model = moekit_model(cfg, device)
    checkpoint_activations(model, mode)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.0))
    precision = Precision.BF16 if device.type == "cuda" else Precision.FP32
    step = TrainStep(model, StepConfig(precision=precision, max_grad_norm=1.0))
    forward = torch.compile(model) if compiled else model
    data = _tokens(cfg, batch, seq_len, device)
    x, y = data[:, :-1], data[:, 1:]
    return lambda: step(
        optimizer, [None], lambda _: forward(x, y), lambda out, _: model_loss(out, None)
    )


def hf_step(
    cfg: ModelConfig,
    family: str,
    experts: str,
    device: torch.device,
    batch: int,
    seq_len: int,
    mode: str,
    compiled: bool,
) -> Step:
    """One step of the loop users write around a transformers model: autocast, backward, clip,
    fused AdamW; `blocks` is transformers' gradient checkpointing."""
    model = hf_model(cfg, family, experts, device)
    model.train()
    if mode == "blocks":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, **fused)
    forward = torch.compile(model) if compiled else model
    ids = _tokens(cfg, batch, seq_len, device)[:, :-1]  # transformers shifts the labels itself
    cast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with cast:
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step
