"""Mixtral (`MixtralForCausalLM`): every layer MoE, top-k weights always renormalized."""

from __future__ import annotations

from typing import Any

from moekit.integrations.hf.families import Family, UnsupportedCheckpoint, common, register_family
from moekit.integrations.hf.links import Link, decoder, routed_experts
from moekit.model.config import ModelConfig


@register_family
class Mixtral(Family):
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    expert_weights = ("w1", "w3", "w2")

    def model_config(self, hf: Any, max_seq_len: int | None = None) -> ModelConfig:
        longest = common.context(hf, max_seq_len)
        window = getattr(hf, "sliding_window", None)
        return common.decoder_config(
            self,
            hf,
            d_hidden=int(hf.intermediate_size),
            renormalize=True,
            head_size=common.head_size(hf),
            # a sliding window equals full attention up to its length: contexts stop there
            max_seq_len=min(longest, window) if window else longest,
        )

    def claims(self, cfg: ModelConfig) -> bool:
        return not cfg.moe.n_shared_experts and cfg.qk_norm == "none"

    def check(self, cfg: ModelConfig) -> None:
        common.check_exportable(cfg)
        if not cfg.moe.router.renormalize:
            raise UnsupportedCheckpoint(
                "router.renormalize=False without q/k norm or a shared expert: Mixtral always "
                "renormalizes; the families with norm_topk_prob=False need qk_norm (Qwen3-MoE "
                "'head', OLMoE 'full') or a gated shared expert (Qwen2-MoE)"
            )
        common.refuse_layout(self, cfg, qkv_bias=False, sparse=False)

    def hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
        router = cfg.moe.router
        jitter = router.noise_std if router.noise == "jitter" else 0.0
        return {
            **common.base_hf_config(self, cfg, "intermediate_size"),
            "num_local_experts": cfg.moe.n_experts,
            "sliding_window": None,
            "router_jitter_noise": jitter,
            "head_dim": cfg.head_dim,
        }

    def links(self, cfg: ModelConfig) -> list[Link]:
        names = self.expert_weights
        return decoder(
            cfg, lambda ours, theirs: routed_experts(ours, f"{theirs}block_sparse_moe.", cfg, names)
        )
