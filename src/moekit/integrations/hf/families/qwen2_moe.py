"""Qwen2-MoE (`Qwen2MoeForCausalLM`): a sigmoid-gated shared expert, q/k/v biases, sparse steps."""

from __future__ import annotations

from typing import Any

from moekit.integrations.hf.families import Family, common, register_family
from moekit.integrations.hf.links import (
    DENSE_WEIGHTS,
    Link,
    decoder,
    gated_mlps,
    routed_experts,
    same,
)
from moekit.model.config import ModelConfig


@register_family
class Qwen2Moe(Family):
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"

    def model_config(self, hf: Any, max_seq_len: int | None = None) -> ModelConfig:
        d_hidden = int(hf.moe_intermediate_size)
        shared = int(hf.shared_expert_intermediate_size)  # moekit: n_shared_experts x d_hidden
        if shared % d_hidden:
            what = f"shared_expert_intermediate_size={shared}"
            self.refuse(f"{what} is not a multiple of moe_intermediate_size={d_hidden}")
        return common.decoder_config(
            self,
            hf,
            d_hidden=d_hidden,
            renormalize=bool(hf.norm_topk_prob),
            n_shared_experts=shared // d_hidden,
            shared_gate=True,
            qkv_bias=bool(hf.qkv_bias),
            moe_every=common.sparse_step(self, hf),
            max_seq_len=common.context(hf, max_seq_len),
        )

    def claims(self, cfg: ModelConfig) -> bool:
        return cfg.moe.n_shared_experts > 0

    def check(self, cfg: ModelConfig) -> None:
        common.check_exportable(cfg)
        if cfg.qk_norm != "none" or cfg.head_size is not None:
            self.refuse("a gated shared expert needs plain attention (no qk_norm, head_size)")
        common.refuse_layout(self, cfg, qkv_bias=True, sparse=True)

    def hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
        m = cfg.moe
        return {
            **common.base_hf_config(self, cfg, "moe_intermediate_size"),
            "num_experts": m.n_experts,
            "norm_topk_prob": m.router.renormalize,
            **common.sparse_hf_config(cfg),
            "shared_expert_intermediate_size": m.n_shared_experts * m.d_hidden,
            "qkv_bias": cfg.qkv_bias,
        }

    def links(self, cfg: ModelConfig) -> list[Link]:
        def moe(ours: str, theirs: str) -> list[Link]:
            block = f"{theirs}mlp."
            shared = [f"{block}shared_expert."]
            return [
                *routed_experts(ours, block, cfg, DENSE_WEIGHTS),
                *gated_mlps(f"{ours}shared.w1", f"{ours}shared.w2", shared, DENSE_WEIGHTS),
                same(f"{ours}shared.gate", f"{block}shared_expert_gate.weight"),
            ]

        return decoder(cfg, moe)
