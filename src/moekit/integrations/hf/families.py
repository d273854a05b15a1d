"""The Hugging Face MoE families moekit converts, one table each, and their config mapping.

A `Family` says where a family keeps what moekit's `Transformer` needs: the MoE block's name
on disk, the per-expert weight names, which config flag renormalizes the top-k weights, and
which attention extras it has. `model_config` reads an HF config into a `ModelConfig` and
`hf_config` writes one back; each refuses what the other side cannot represent, by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moekit.config import ExpertConfig, MoEConfig, RouterConfig
from moekit.model.config import ModelConfig

# HF hidden_act -> the gated activation moekit computes as act(gate) * up
GATED = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "relu": "reglu"}


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # the class AutoModelForCausalLM builds
    moe_block: str  # name of the MoE block in checkpoints save_pretrained writes
    expert_weights: tuple[str, str, str]  # per-expert gate, up and down projection names
    expert_hidden: str  # config attribute of the routed experts' hidden size
    qk_norm: str  # ModelConfig.qk_norm of the family
    shared_expert: bool  # one gated shared expert per MoE block (Qwen2-MoE)
    topk_norm: str | None  # config flag renormalizing the top-k weights; None = always
    sparse_step: bool  # decoder_sparse_step / mlp_only_layers choose the MoE layers
    qkv_bias: str | None  # config flag of q/k/v projection biases, if the family has one
    head_dim: bool  # the config may set head_dim apart from hidden_size / heads


FAMILIES = {
    f.model_type: f
    for f in (
        Family(
            model_type="mixtral",
            architecture="MixtralForCausalLM",
            moe_block="block_sparse_moe",
            expert_weights=("w1", "w3", "w2"),
            expert_hidden="intermediate_size",
            qk_norm="none",
            shared_expert=False,
            topk_norm=None,
            sparse_step=False,
            qkv_bias=None,
            head_dim=True,
        ),
        Family(
            model_type="qwen2_moe",
            architecture="Qwen2MoeForCausalLM",
            moe_block="mlp",
            expert_weights=("gate_proj", "up_proj", "down_proj"),
            expert_hidden="moe_intermediate_size",
            qk_norm="none",
            shared_expert=True,
            topk_norm="norm_topk_prob",
            sparse_step=True,
            qkv_bias="qkv_bias",
            head_dim=False,
        ),
        Family(
            model_type="qwen3_moe",
            architecture="Qwen3MoeForCausalLM",
            moe_block="mlp",
            expert_weights=("gate_proj", "up_proj", "down_proj"),
            expert_hidden="moe_intermediate_size",
            qk_norm="head",
            shared_expert=False,
            topk_norm="norm_topk_prob",
            sparse_step=True,
            qkv_bias=None,
            head_dim=True,
        ),
        Family(
            model_type="olmoe",
            architecture="OlmoeForCausalLM",
            moe_block="mlp",
            expert_weights=("gate_proj", "up_proj", "down_proj"),
            expert_hidden="intermediate_size",
            qk_norm="full",
            shared_expert=False,
            topk_norm="norm_topk_prob",
            sparse_step=False,
            qkv_bias=None,
            head_dim=False,
        ),
    )
}


class UnsupportedCheckpoint(ValueError):
    """An HF checkpoint (or a moekit model) that the other side cannot represent exactly."""


def family_of(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise UnsupportedCheckpoint(
            f"model_type={model_type!r} is not supported; supported: {', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type]


def _refuse(family: Family, what: str) -> None:
    raise UnsupportedCheckpoint(f"{family.model_type}: {what}")


def _rope_theta(family: Family, hf: Any) -> float:
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        _refuse(family, f"rope_parameters.rope_type={rope['rope_type']!r} (only 'default' RoPE)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse(family, "rope_parameters.partial_rotary_factor != 1 is not supported")
    return float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))


def _moe_every(family: Family, hf: Any) -> int:
    if not family.sparse_step:
        return 1
    if list(getattr(hf, "mlp_only_layers", None) or []):
        _refuse(family, f"mlp_only_layers={hf.mlp_only_layers} (moekit places MoE layers by step)")
    step = int(getattr(hf, "decoder_sparse_step", 1))
    if step < 1 or int(getattr(hf, "num_experts", 0) or 0) < 1:
        _refuse(family, "has no MoE layers (num_experts=0 or decoder_sparse_step < 1)")
    return step


def _check_attention(family: Family, hf: Any) -> bool:
    """The q/k/v bias flag; refuses attention features moekit's attention lacks."""
    if getattr(hf, "attention_bias", False):
        _refuse(family, "attention_bias=True (an output-projection bias) is not supported")
    if getattr(hf, "clip_qkv", None) is not None:
        _refuse(family, f"clip_qkv={hf.clip_qkv} is not supported")
    if getattr(hf, "use_sliding_window", False):
        _refuse(family, "use_sliding_window=True is not supported")
    return bool(getattr(hf, family.qkv_bias)) if family.qkv_bias else False


def _head_size(family: Family, hf: Any) -> int | None:
    head_dim = getattr(hf, "head_dim", None) if family.head_dim else None
    default = hf.hidden_size // hf.num_attention_heads
    if head_dim is None or (head_dim == default and hf.hidden_size % hf.num_attention_heads == 0):
        return None
    return int(head_dim)


def _router(family: Family, hf: Any) -> RouterConfig:
    renormalize = True if family.topk_norm is None else bool(getattr(hf, family.topk_norm))
    jitter = float(getattr(hf, "router_jitter_noise", 0.0) or 0.0)
    return RouterConfig(
        kind="topk",
        renormalize=renormalize,
        noise="jitter" if jitter > 0 else "none",
        noise_std=jitter if jitter > 0 else 1.0,
        load_balance_weight=float(getattr(hf, "router_aux_loss_coef", 0.0) or 0.0),
        z_loss_weight=float(getattr(hf, "router_z_loss_coef", 0.0) or 0.0),
    )


def model_config(hf: Any, max_seq_len: int | None = None) -> ModelConfig:
    """The moekit `ModelConfig` of an HF config object (a transformers PretrainedConfig)."""
    family = family_of(getattr(hf, "model_type", None))
    act = GATED.get(hf.hidden_act)
    if act is None:
        _refuse(family, f"hidden_act={hf.hidden_act!r} is not one of {', '.join(GATED)}")
    d_hidden = int(getattr(hf, family.expert_hidden))
    n_shared, gate = 0, False
    if family.shared_expert:
        shared = int(hf.shared_expert_intermediate_size)
        if shared % d_hidden:
            what = f"shared_expert_intermediate_size={shared}"
            _refuse(family, f"{what} is not a multiple of {family.expert_hidden}={d_hidden}")
        n_shared, gate = shared // d_hidden, True
    window = getattr(hf, "sliding_window", None) if family.model_type == "mixtral" else None
    longest = int(hf.max_position_embeddings) if max_seq_len is None else max_seq_len
    moe = MoEConfig(
        d_model=hf.hidden_size,
        d_hidden=d_hidden,
        n_experts=int(hf.num_experts),  # an alias of num_local_experts where a family uses that
        k=int(hf.num_experts_per_tok),
        n_shared_experts=n_shared,
        shared_gate=gate,
        router=_router(family, hf),
        expert=ExpertConfig(activation=act, init_std=float(hf.initializer_range)),
    )
    return ModelConfig(
        vocab_size=hf.vocab_size,
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        n_kv_heads=getattr(hf, "num_key_value_heads", None),
        head_size=_head_size(family, hf),
        qk_norm=family.qk_norm,
        qkv_bias=_check_attention(family, hf),
        # a Mixtral sliding window equals full attention up to its length: contexts stop there
        max_seq_len=min(longest, window) if window else longest,
        norm="rms",
        norm_eps=float(hf.rms_norm_eps),
        rope_theta=_rope_theta(family, hf),
        d_ff=int(getattr(hf, "intermediate_size", d_hidden)),
        activation=act,
        moe=moe,
        moe_every=_moe_every(family, hf),
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        init_std=float(hf.initializer_range),
    )


def family_for(cfg: ModelConfig) -> Family:
    """The family a moekit model maps onto exactly; UnsupportedCheckpoint says why none does."""
    _check_exportable(cfg)
    m = cfg.moe
    if m.n_shared_experts:
        family = FAMILIES["qwen2_moe"]
        if cfg.qk_norm != "none" or cfg.head_size is not None:
            _refuse(family, "a gated shared expert needs plain attention (no qk_norm, head_size)")
    elif cfg.qk_norm == "head":
        family = FAMILIES["qwen3_moe"]
    elif cfg.qk_norm == "full":
        family = FAMILIES["olmoe"]
        if cfg.head_size is not None:
            _refuse(family, f"head_size={cfg.head_size}: OLMoE heads are d_model / n_heads wide")
    else:
        family = FAMILIES["mixtral"]
        if not m.router.renormalize:
            raise UnsupportedCheckpoint(
                "router.renormalize=False without q/k norm or a shared expert: Mixtral always "
                "renormalizes; the families with norm_topk_prob=False need qk_norm (Qwen3-MoE "
                "'head', OLMoE 'full') or a gated shared expert (Qwen2-MoE)"
            )
    if cfg.qkv_bias and family.qkv_bias is None:
        _refuse(family, "qkv_bias=True: this family has no q/k/v biases")
    if cfg.moe_every != 1 and not family.sparse_step:
        _refuse(family, f"moe_every={cfg.moe_every}: every layer of this family is MoE")
    return family


def _check_exportable(cfg: ModelConfig) -> None:
    """Refuse, by field, what none of the families can hold."""
    m, r = cfg.moe, cfg.moe.router
    kind = getattr(m.expert, "kind", "mlp")  # registered expert classes other than the MLP
    problems = [
        ("vocab_size=None (an HF causal LM reads and writes tokens)", cfg.vocab_size is None),
        (f"d_in={cfg.d_in} / d_out={cfg.d_out}", cfg.d_in is not None or cfg.d_out is not None),
        (f"norm={cfg.norm!r} (HF MoE families use RMSNorm)", cfg.norm != "rms"),
        ("moe_every=0 (no MoE layers)", cfg.moe_every == 0),
        (f"router.kind={r.kind!r} (HF families route by softmax top-k)", r.kind != "topk"),
        (f"router.temperature={r.temperature}", r.temperature != 1.0),
        (f"router.pre_norm={r.pre_norm!r}", r.pre_norm != "none"),
        (f"router.scaling_factor={r.scaling_factor}", r.scaling_factor != 1.0),
        (f"router.n_groups={r.n_groups}", r.n_groups != 1),
        ("router.constellations", r.constellations is not None),
        (f"capacity_factor={m.capacity_factor} (HF experts are dropless)", m.capacity_factor),
        (f"fallback={m.fallback!r}", m.fallback != "zero"),
        (f"dedup_threshold={m.dedup_threshold}", m.dedup_threshold is not None),
        ("expert.bias=True", m.expert.bias),
        (f"expert.kind={kind!r} (HF experts are gated MLPs)", kind != "mlp"),
        (
            f"expert.activation={m.expert.activation!r} (gated ones only)",
            m.expert.activation not in GATED.values(),
        ),
        (
            "n_shared_experts without shared_gate (no such family)",
            m.n_shared_experts > 0 and not m.shared_gate,
        ),
        (
            f"activation={cfg.activation!r} differs from expert.activation (one hidden_act)",
            cfg.moe_every != 1 and cfg.activation != m.expert.activation,
        ),
    ]
    bad = [what for what, wrong in problems if wrong]
    if bad:
        raise UnsupportedCheckpoint("no Hugging Face family holds " + "; ".join(bad))


def hf_config(cfg: ModelConfig, family: Family) -> dict[str, Any]:
    """Keyword arguments of the family's transformers config class for a moekit model."""
    m = cfg.moe
    act = {gated: plain for plain, gated in GATED.items() if plain != "swish"}[m.expert.activation]
    out: dict[str, Any] = {
        "architectures": [family.architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "hidden_act": act,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "num_experts_per_tok": m.k,
        "router_aux_loss_coef": m.router.load_balance_weight,
        family.expert_hidden: m.d_hidden,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    if family.model_type == "mixtral":
        jitter = m.router.noise_std if m.router.noise == "jitter" else 0.0
        out.update(num_local_experts=m.n_experts, sliding_window=None, router_jitter_noise=jitter)
    else:
        out.update(num_experts=m.n_experts, norm_topk_prob=m.router.renormalize)
    if family.head_dim:
        out["head_dim"] = cfg.head_dim
    if family.sparse_step:
        out.update(
            decoder_sparse_step=cfg.moe_every, mlp_only_layers=[], intermediate_size=cfg.d_ff
        )
    if family.shared_expert:
        out["shared_expert_intermediate_size"] = m.n_shared_experts * m.d_hidden
    if family.qkv_bias:
        out[family.qkv_bias] = cfg.qkv_bias
    if family.model_type in ("qwen3_moe", "olmoe"):
        out["attention_bias"] = False
    return out
