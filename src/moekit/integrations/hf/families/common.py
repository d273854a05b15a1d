"""What the Llama-style softmax top-k families share: config fields read and written alike.

A family file composes these: `decoder_config` reads the fields every such HF config has,
`check_exportable` refuses what none of them can hold, and `base_hf_config` writes the
fields they all have. What differs (field names, extras, refusals) stays in the family file.
"""

from __future__ import annotations

from typing import Any

from moekit.config import ExpertConfig, MoEConfig, RouterConfig
from moekit.integrations.hf.families import Family, UnsupportedCheckpoint
from moekit.model.config import ModelConfig

# HF hidden_act -> the gated activation moekit computes as act(gate) * up
GATED = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "relu": "reglu"}


def gated_activation(family: Family, hf: Any) -> str:
    act = GATED.get(hf.hidden_act)
    if act is None:
        family.refuse(f"hidden_act={hf.hidden_act!r} is not one of {', '.join(GATED)}")
    return act


def rope_theta(family: Family, hf: Any) -> float:
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        family.refuse(f"rope_parameters.rope_type={rope['rope_type']!r} (only 'default' RoPE)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        family.refuse("rope_parameters.partial_rotary_factor != 1 is not supported")
    return float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))


def refuse_attention_extras(family: Family, hf: Any) -> None:
    """Refuse the attention features moekit's attention lacks."""
    if getattr(hf, "attention_bias", False):
        family.refuse("attention_bias=True (an output-projection bias) is not supported")
    if getattr(hf, "clip_qkv", None) is not None:
        family.refuse(f"clip_qkv={hf.clip_qkv} is not supported")
    if getattr(hf, "use_sliding_window", False):
        family.refuse("use_sliding_window=True is not supported")


def head_size(hf: Any) -> int | None:
    """ModelConfig.head_size of a config that may set head_dim apart from hidden / heads."""
    head_dim = getattr(hf, "head_dim", None)
    default = hf.hidden_size // hf.num_attention_heads
    if head_dim is None or (head_dim == default and hf.hidden_size % hf.num_attention_heads == 0):
        return None
    return int(head_dim)


def sparse_step(family: Family, hf: Any) -> int:
    """moe_every of a config whose decoder_sparse_step / mlp_only_layers place the MoE layers."""
    if list(getattr(hf, "mlp_only_layers", None) or []):
        family.refuse(f"mlp_only_layers={hf.mlp_only_layers} (moekit places MoE layers by step)")
    step = int(getattr(hf, "decoder_sparse_step", 1))
    if step < 1 or int(getattr(hf, "num_experts", 0) or 0) < 1:
        family.refuse("has no MoE layers (num_experts=0 or decoder_sparse_step < 1)")
    return step


def context(hf: Any, max_seq_len: int | None) -> int:
    """The longest context: the caller's, else the model's max_position_embeddings."""
    return int(hf.max_position_embeddings) if max_seq_len is None else max_seq_len


def decoder_config(
    family: Family,
    hf: Any,
    *,
    d_hidden: int,
    renormalize: bool,
    max_seq_len: int,
    moe_every: int = 1,
    head_size: int | None = None,
    qk_norm: str = "none",
    qkv_bias: bool = False,
    n_shared_experts: int = 0,
    shared_gate: bool = False,
) -> ModelConfig:
    """The ModelConfig of a pre-norm RMSNorm/RoPE decoder with softmax top-k gated experts."""
    act = gated_activation(family, hf)
    jitter = float(getattr(hf, "router_jitter_noise", 0.0) or 0.0)
    router = RouterConfig(
        kind="topk",
        renormalize=renormalize,
        noise="jitter" if jitter > 0 else "none",
        noise_std=jitter if jitter > 0 else 1.0,
        load_balance_weight=float(getattr(hf, "router_aux_loss_coef", 0.0) or 0.0),
        z_loss_weight=float(getattr(hf, "router_z_loss_coef", 0.0) or 0.0),
    )
    moe = MoEConfig(
        d_model=hf.hidden_size,
        d_hidden=d_hidden,
        n_experts=int(hf.num_experts),  # an alias of num_local_experts where a family uses that
        k=int(hf.num_experts_per_tok),
        n_shared_experts=n_shared_experts,
        shared_gate=shared_gate,
        router=router,
        expert=ExpertConfig(activation=act, init_std=float(hf.initializer_range)),
    )
    refuse_attention_extras(family, hf)
    return ModelConfig(
        vocab_size=hf.vocab_size,
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        n_kv_heads=getattr(hf, "num_key_value_heads", None),
        head_size=head_size,
        qk_norm=qk_norm,
        qkv_bias=qkv_bias,
        max_seq_len=max_seq_len,
        norm="rms",
        norm_eps=float(hf.rms_norm_eps),
        rope_theta=rope_theta(family, hf),
        d_ff=int(getattr(hf, "intermediate_size", d_hidden)),
        activation=act,
        moe=moe,
        moe_every=moe_every,
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        init_std=float(hf.initializer_range),
    )


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse, by field, what none of the softmax top-k gated-MLP families can hold."""
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


def refuse_layout(family: Family, cfg: ModelConfig, qkv_bias: bool, sparse: bool) -> None:
    """Refuse q/k/v biases and dense layers where the family has none."""
    if cfg.qkv_bias and not qkv_bias:
        family.refuse("qkv_bias=True: this family has no q/k/v biases")
    if cfg.moe_every != 1 and not sparse:
        family.refuse(f"moe_every={cfg.moe_every}: every layer of this family is MoE")


def base_hf_config(family: Family, cfg: ModelConfig, expert_hidden: str) -> dict[str, Any]:
    """The HF config fields every such family has; `expert_hidden` names the experts' width."""
    m = cfg.moe
    act = {gated: plain for plain, gated in GATED.items() if plain != "swish"}[m.expert.activation]
    return {
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
        expert_hidden: m.d_hidden,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }


def sparse_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The fields of a family that places MoE layers by decoder_sparse_step."""
    return {
        "decoder_sparse_step": cfg.moe_every,
        "mlp_only_layers": [],
        "intermediate_size": cfg.d_ff,
    }
