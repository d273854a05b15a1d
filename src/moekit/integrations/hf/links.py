"""Which Hugging Face weights make each moekit weight, and how (one `Link` per moekit tensor).

The names on the HF side are those `save_pretrained` writes (per-expert matrices, Mixtral's
`block_sparse_moe`); `join` turns them into moekit's tensor and `split` turns it back, so
both directions of the conversion read the same list. Linear weights are [out, in] in HF
and experts [in, out] in moekit (w1 [E, D, 2H] = gate then up, w2 [E, H, D]). A family file
builds its list from these pieces; `decoder` is the Llama-style skeleton they share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.model.config import ModelConfig

DENSE_WEIGHTS = ("gate_proj", "up_proj", "down_proj")  # dense and shared MLPs of every family


@dataclass(frozen=True)
class Link:
    ours: str  # moekit state-dict name
    theirs: tuple[str, ...]  # HF names it is made of, in `split` order
    join: Callable[[list[Tensor]], Tensor]  # HF tensors -> ours
    split: Callable[[Tensor], list[Tensor]]  # ours -> HF tensors


def same(ours: str, theirs: str) -> Link:
    return Link(ours, (theirs,), lambda ts: ts[0], lambda t: [t])


def rows(ours: str, theirs: list[str], sizes: list[int]) -> Link:
    """Ours stacks theirs along dim 0 (the fused q/k/v projection)."""
    return Link(ours, tuple(theirs), lambda ts: torch.cat(ts), lambda t: list(t.split(sizes)))


def gated_mlps(w1: str, w2: str, prefixes: list[str], names: tuple[str, ...]) -> list[Link]:
    """w1 [E, D, 2H] and w2 [E, H, D] from E HF MLPs named prefix + gate / up / down."""
    gate, up, down = names

    def join_w1(ts: list[Tensor]) -> Tensor:  # [g0, u0, g1, u1, ...] each [H, D]
        pairs = zip(ts[::2], ts[1::2], strict=True)
        return torch.stack([torch.cat([g.T, u.T], -1) for g, u in pairs])

    def split_w1(t: Tensor) -> list[Tensor]:
        H = t.shape[-1] // 2
        return [half.T for e in range(t.shape[0]) for half in (t[e, :, :H], t[e, :, H:])]

    return [
        Link(
            w1,
            tuple(f"{p}{n}.weight" for p in prefixes for n in (gate, up)),
            join_w1,
            split_w1,
        ),
        Link(
            w2,
            tuple(f"{p}{down}.weight" for p in prefixes),
            lambda ts: torch.stack([d.T for d in ts]),
            lambda t: [t[e].T for e in range(t.shape[0])],
        ),
    ]


def attention(ours: str, theirs: str, cfg: ModelConfig) -> list[Link]:
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    proj = [f"{theirs}{p}_proj" for p in "qkv"]
    out = [
        rows(f"{ours}qkv.weight", [f"{p}.weight" for p in proj], [q, kv, kv]),
        same(f"{ours}proj.weight", f"{theirs}o_proj.weight"),
    ]
    if cfg.qkv_bias:
        out.append(rows(f"{ours}qkv.bias", [f"{p}.bias" for p in proj], [q, kv, kv]))
    if cfg.qk_norm != "none":
        out += [same(f"{ours}{n}.weight", f"{theirs}{n}.weight") for n in ("q_norm", "k_norm")]
    return out


def routed_experts(ours: str, theirs: str, cfg: ModelConfig, names: tuple[str, ...]) -> list[Link]:
    """The router and E experts of an MoE block whose experts are HF MLPs named `names`."""
    experts = [f"{theirs}experts.{e}." for e in range(cfg.moe.n_experts)]
    out = [same(f"{ours}router.weight", f"{theirs}gate.weight")]
    return out + gated_mlps(f"{ours}experts.w1", f"{ours}experts.w2", experts, names)


def decoder(cfg: ModelConfig, moe: Callable[[str, str], list[Link]]) -> list[Link]:
    """Every moekit weight of a Llama-style decoder, in checkpoint order.

    `moe(ours, theirs)` gives an MoE layer's links from its block prefixes (`blocks.{i}.ffn.`,
    `model.layers.{i}.`); dense layers are gated MLPs under `mlp.`.
    """
    out = [same("embed.weight", "model.embed_tokens.weight")]
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        out += [
            same(f"{ours}norm1.weight", f"{theirs}input_layernorm.weight"),
            same(f"{ours}norm2.weight", f"{theirs}post_attention_layernorm.weight"),
        ]
        out += attention(f"{ours}attn.", f"{theirs}self_attn.", cfg)
        if cfg.is_moe_layer(i):
            out += moe(f"{ours}ffn.", theirs)
        else:
            mlp = [f"{theirs}mlp."]
            out += gated_mlps(f"{ours}ffn.w1", f"{ours}ffn.w2", mlp, DENSE_WEIGHTS)
    out.append(same("norm.weight", "model.norm.weight"))
    if not cfg.tie_embeddings:
        out.append(same("head.weight", "lm_head.weight"))
    return out
