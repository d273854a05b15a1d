"""OLMoE (`OlmoeForCausalLM`): every layer MoE, q and k RMS-normed across all heads at once."""

from __future__ import annotations

from typing import Any

from moekit.integrations.hf.families import Family, common, register_family
from moekit.integrations.hf.links import DENSE_WEIGHTS, Link, decoder, routed_experts
from moekit.model.config import ModelConfig


@register_family
class Olmoe(Family):
    model_type = "olmoe"
    architecture = "OlmoeForCausalLM"

    def model_config(self, hf: Any, max_seq_len: int | None = None) -> ModelConfig:
        return common.decoder_config(
            self,
            hf,
            d_hidden=int(hf.intermediate_size),
            renormalize=bool(hf.norm_topk_prob),
            qk_norm="full",
            max_seq_len=common.context(hf, max_seq_len),
        )

    def claims(self, cfg: ModelConfig) -> bool:
        return not cfg.moe.n_shared_experts and cfg.qk_norm == "full"

    def check(self, cfg: ModelConfig) -> None:
        common.check_exportable(cfg)
        if cfg.head_size is not None:
            self.refuse(f"head_size={cfg.head_size}: OLMoE heads are d_model / n_heads wide")
        common.refuse_layout(self, cfg, qkv_bias=False, sparse=False)

    def hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
        return {
            **common.base_hf_config(self, cfg, "intermediate_size"),
            "num_experts": cfg.moe.n_experts,
            "norm_topk_prob": cfg.moe.router.renormalize,
            "attention_bias": False,
        }

    def links(self, cfg: ModelConfig) -> list[Link]:
        return decoder(
            cfg, lambda ours, theirs: routed_experts(ours, f"{theirs}mlp.", cfg, DENSE_WEIGHTS)
        )
