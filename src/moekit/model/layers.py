"""Transformer building blocks: norms, rotary embeddings, causal attention and the block.

Shapes: B batch, S new positions, P past positions (in the KV cache), W keys attended
(P + S), D model, H heads, Hkv kv heads, Dh head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import ExpertConfig
from moekit.experts import DenseMLP
from moekit.layer import MoE, MoEInfo
from moekit.model.cache import AttentionCache
from moekit.model.config import ModelConfig
from moekit.ranges import stage


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019), computed in float32."""

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return (y * self.weight).to(x.dtype)


def build_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rms":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021), angles computed for any position."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [Dh/2]

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """x [B, H, S, Dh] rotated at positions [S] (shared by rows) or [B, S]; None: 0..S-1."""
        if positions is None:
            positions = torch.arange(x.shape[2], device=x.device, dtype=torch.float32)
        angles = positions.float()[..., None] * self.inv_freq  # [S, Dh/2] or [B, S, Dh/2]
        if angles.dim() == 3:
            angles = angles[:, None]  # [B, 1, S, Dh/2]: each row its own, shared by heads
        cos, sin = angles.cos(), angles.sin()
        x1, x2 = x.float().chunk(2, dim=-1)  # rotate pairs (x1, x2) of the two halves
        out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
        return out.to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with grouped-query heads, RoPE and an optional KV cache."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(q_dim, cfg.d_model, bias=False)
        self.rotary = Rotary(self.head_dim, cfg.rope_theta)
        self.dropout = cfg.dropout
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":  # over one head's width (Qwen3) or every head's (OLMoE)
            per_head = cfg.qk_norm == "head"
            self.q_norm = RMSNorm(self.head_dim if per_head else q_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim if per_head else kv_dim, cfg.norm_eps)

    def forward(
        self,
        x: Tensor,
        positions: Tensor | None = None,
        cache: AttentionCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        """x [B, S, D] at positions [S] or [B, S] (None: 0..S-1), after what `cache` holds."""
        B, S, _ = x.shape
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        q, k, v = self.qkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        if self.qk_norm == "full":  # OLMoE: over all heads' features at once
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.head_dim)
        k = k.view(B, S, self.n_kv, self.head_dim)
        if self.qk_norm == "head":  # Qwen3: over each head's features
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, S, Dh], [B, Hkv, S, Dh]
        v = v.view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        mask = None
        if cache is not None:
            k, v, mask = cache.update(layer, k, v)  # [B, Hkv, W, Dh], mask [B, 1, S, W]
        past = k.shape[2] - S
        if mask is not None and S == 1 and self.n_kv != self.n_heads:  # a cached decode step
            y = grouped_decode_attention(q, k, v, mask)
            return self.proj(y.transpose(1, 2).reshape(B, S, q_dim))
        if mask is None and past and S > 1:
            mask = causal_mask(S, past, x.device)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and past == 0 and S > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv != self.n_heads,
        )  # [B, H, S, Dh]
        return self.proj(y.transpose(1, 2).reshape(B, S, q_dim))


def grouped_decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """One query position: q [B, H, 1, Dh] over k, v [B, Hkv, W, Dh] under mask [B, 1, 1, W].

    SDPA's fused kernels take a mask or grouped heads, not both (it then copies K and V for
    every query head); each kv head's G = H / Hkv queries become G query positions of one head,
    plain masked attention that they run. Query head h reads kv head h // G either way.
    """
    B, H, _, Dh = q.shape
    Hkv = k.shape[1]
    y = F.scaled_dot_product_attention(
        q.reshape(B, Hkv, H // Hkv, Dh), k, v, attn_mask=mask
    )  # [B, Hkv, G, Dh]; the mask row is shared by the G queries
    return y.reshape(B, H, 1, Dh)


def causal_mask(S: int, past: int, device: torch.device) -> Tensor:
    """[S, P + S] bool: new position i sees every past position and new positions <= i."""
    i = torch.arange(S, device=device)[:, None]
    j = torch.arange(past + S, device=device)[None, :]
    return j <= i + past


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)); ffn is MoE or dense."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.norm1, self.norm2 = build_norm(cfg), build_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.is_moe = cfg.is_moe_layer(index)
        if self.is_moe:
            self.ffn: nn.Module = MoE(cfg.moe)
        else:
            expert = ExpertConfig(activation=cfg.activation, init_std=cfg.init_std)
            self.ffn = DenseMLP(cfg.d_model, cfg.d_ff, expert)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: Tensor, positions: Tensor | None = None, cache: AttentionCache | None = None
    ) -> tuple[Tensor, MoEInfo | None]:
        # x: [B, S, D]; positions: [S] or [B, S]
        with stage("attention"):
            x = x + self.drop(self.attn(self.norm1(x), positions, cache, self.index))
        h = self.norm2(x)
        info = None
        if self.is_moe:
            h, info = self.ffn(h)
        else:
            h = self.ffn(h)
        return x + self.drop(h), info
