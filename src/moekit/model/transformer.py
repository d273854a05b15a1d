"""`Transformer`: a decoder-only model with MoE feed-forward blocks.

tokens [B, S] (or vectors [B, S, d_in]) -> embed -> n_layers x Block -> norm -> head
-> logits [B, S, vocab] (or predictions [B, S, d_out]). Every MoE layer's weighted aux loss
is summed into `ModelOutput.aux_loss`; per-layer routing metrics come back in `layers`.
Training, `generate` and the server run this one forward; the last two pass a cache
(`moekit.model.cache.AttentionCache`) that holds past positions, per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layer import MoEInfo
from moekit.model.cache import AttentionCache, KVCache
from moekit.model.config import ModelConfig
from moekit.model.layers import Block, build_norm
from moekit.model.loss import chunked_cross_entropy
from moekit.routing.losses import training_loss


@dataclass
class ModelOutput:
    """out: logits [B, S, V] or predictions [B, S, d_out]; loss = task_loss + w * aux_loss.

    With `ModelConfig.loss_chunk_tokens` the training loss is computed without the whole
    logits; `out` is then computed from the kept head input when first read.
    """

    layers: list[MoEInfo | None]  # one per block; None for dense blocks
    task_loss: Tensor | None = None
    loss: Tensor | None = None
    logits: Tensor | None = field(default=None, repr=False)  # out, once computed
    head_input: tuple[nn.Module, Tensor] | None = field(default=None, repr=False)
    _aux: Tensor | None = field(default=None, init=False, repr=False)

    @property
    def out(self) -> Tensor:
        if self.logits is None:
            head, h = self.head_input  # type: ignore[misc]
            self.logits = head(h)
        return self.logits

    @property
    def aux_loss(self) -> Tensor:
        """Sum over MoE layers of their router-weighted aux losses; computed when first read,
        so generation and serving, which never read it, do not pay for it."""
        if self._aux is None:
            aux = torch.zeros((), dtype=torch.float32, device=self._device())
            for info in self.layers:
                if info is not None:
                    aux = aux + info.aux_loss
            self._aux = aux
        return self._aux

    def _device(self) -> torch.device:
        return self.logits.device if self.logits is not None else self.head_input[1].device


class Transformer(nn.Module):
    """Decoder-only transformer for token LM or continuous-sequence regression."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None and cfg.d_in is None:
            raise ValueError("model.vocab_size or model.d_in must be set to build a model")
        self.cfg = cfg
        if cfg.vocab_size is not None:
            self.embed: nn.Module = nn.Embedding(cfg.vocab_size, cfg.d_model)
        else:
            self.embed = nn.Linear(cfg.d_in, cfg.d_model)  # type: ignore[arg-type]
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = build_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.out_dim, bias=cfg.d_out is not None)
        self.apply(self._init)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith("attn.proj.weight"):
                nn.init.normal_(p, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=self.cfg.init_std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def is_lm(self) -> bool:
        return self.cfg.d_out is None

    def forward(
        self,
        x: Tensor,
        targets: Tensor | None = None,
        cache: AttentionCache | None = None,
        positions: Tensor | None = None,
    ) -> ModelOutput:
        """x: tokens [B, S] int64 or vectors [B, S, d_in]; targets like the output, or None.

        positions [S] or [B, S] place x for RoPE; by default right after what `cache` holds
        in each row, or 0..S-1 without a cache.
        """
        B, S = x.shape[0], x.shape[1]
        if positions is None and cache is not None:
            positions = cache.positions(B, S, x.device)
        elif positions is not None and tuple(positions.shape) not in ((S,), (B, S)):
            raise ValueError(f"positions must be [S] or [B, S] = [{B}, {S}], got {positions.shape}")
        h = self.drop(self.embed(x))  # [B, S, D]
        infos: list[MoEInfo | None] = []
        for block in self.blocks:
            h, info = block(h, positions, cache)
            infos.append(info)
        h = self.norm(h)
        chunk = self.cfg.loss_chunk_tokens
        if targets is not None and self.is_lm and chunk:  # the logits never live whole
            result = ModelOutput(layers=infos, head_input=(self.head, h))
            b = self.head.bias
            flat = h.flatten(0, -2), targets.flatten()
            result.task_loss = chunked_cross_entropy(flat[0], self.head.weight, b, flat[1], chunk)
        else:
            result = ModelOutput(layers=infos, logits=self.head(h))  # [B, S, V] or [B, S, d_out]
            if targets is not None:
                result.task_loss = self.task_loss(result.out, targets)
        if targets is not None:
            result.loss = training_loss(result.task_loss, result.aux_loss, self.cfg.aux_loss_weight)
        return result

    def task_loss(self, out: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy (nats per token) for LM, mean squared error for regression."""
        if self.is_lm:
            return F.cross_entropy(out.float().flatten(0, -2), targets.flatten())
        return F.mse_loss(out.float(), targets.float())

    def num_params(self) -> dict[str, int]:
        """Total parameters, and active ones: routed experts counted k of n_experts."""
        total = sum(p.numel() for p in self.parameters())
        active = total
        for block in self.blocks:
            if block.is_moe:
                moe = block.ffn
                expert = sum(p.numel() for p in moe.experts.parameters())
                active -= expert - expert * moe.cfg.k // moe.cfg.n_experts
        return {"total": total, "active": active}

    def moe_layers(self) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if b.is_moe]

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layers)

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new: int, **sampling) -> Tensor:
        """Continue `prompt` ([B, S] tokens or [B, S, d_in] vectors) by `max_new` steps.

        Tokens: greedy when temperature=0, else temperature / top_k / top_p sampling.
        Vectors: autoregressive rollout feeding each prediction back (needs d_out == d_in).
        Returns the prompt with the continuation appended.
        """
        from moekit.model.generate import generate

        return generate(self, prompt, max_new, **sampling)
