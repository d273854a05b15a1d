"""Qwen3-MoE (`Qwen3MoeForCausalLM`): q and k RMS-normed per head, MoE every n-th layer."""

from __future__ import annotations

from typing import Any

from moekit.integrations.hf.families import Family, common, register_family
from moekit.integrations.hf.links import DENSE_WEIGHTS, Link, decoder, routed_experts
from moekit.model.config import ModelConfig


@register_family
class Qwen3Moe(Family):
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"

    def model_config(self, hf: Any, max_seq_len: int | None = None) -> ModelConfig:
        return common.decoder_config(
            self,
            hf,
            d_hidden=int(hf.moe_intermediate_size),
            renormalize=bool(hf.norm_topk_prob),
            head_size=common.head_size(hf),
            qk_norm="head",
            moe_every=common.sparse_step(self, hf),
            max_seq_len=common.context(hf, max_seq_len),
        )

    def claims(self, cfg: ModelConfig) -> bool:
        return not cfg.moe.n_shared_experts and cfg.qk_norm == "head"

    def check(self, cfg: ModelConfig) -> None:
        common.check_exportable(cfg)
        common.refuse_layout(self, cfg, qkv_bias=False, sparse=True)

    def hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
        return {
            **common.base_hf_config(self, cfg, "moe_intermediate_size"),
            "num_experts": cfg.moe.n_experts,
            "norm_topk_prob": cfg.moe.router.renormalize,
            "head_dim": cfg.head_dim,
            **common.sparse_hf_config(cfg),
            "attention_bias": False,
        }

    def links(self, cfg: ModelConfig) -> list[Link]:
        return decoder(
            cfg, lambda ours, theirs: routed_experts(ours, f"{theirs}mlp.", cfg, DENSE_WEIGHTS)
        )
