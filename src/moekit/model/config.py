"""`ModelConfig`: the decoder-only transformer, a frozen value validated at construction.

A model reads tokens (``vocab_size``) or continuous vectors (``d_in``) and writes LM logits
(``vocab_size``) or regression outputs (``d_out``). Feed-forward blocks are MoE layers every
``moe_every`` layers (0 = a dense model) and dense MLPs elsewhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from moekit.config import ACTIVATIONS, MoEConfig, build_nested, from_dict

NORMS = ("rms", "layer")
QK_NORMS = ("none", "head", "full")


def _at_least(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"model.{name}={value!r} must be an integer >= {low}")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and options of `Transformer`.

    Inputs are tokens (vocab_size) or vectors (d_in); a training run fills these and d_out
    from its task, so configs for a task leave them unset.
    """

    vocab_size: int | None = None  # token input and LM head
    d_in: int | None = None  # continuous input features (linear input projection)
    d_out: int | None = None  # regression head size; None with vocab_size = LM logits
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads (plain MHA)
    head_size: int | None = None  # per-head width; None = d_model // n_heads (Qwen3 sets its own)
    # RMSNorm of queries and keys before RoPE: per head (Qwen3) or across all heads (OLMoE)
    qk_norm: str = "none"
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    max_seq_len: int = 256  # longest context trained on; generation slides a window past it
    norm: str = "rms"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    dropout: float = 0.0
    d_ff: int = 256  # hidden size of dense FFN blocks
    activation: str = "swiglu"  # dense FFN activation
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(d_model=128, d_hidden=256))
    moe_every: int = 1  # MoE FFN in layers where (i + 1) % moe_every == 0; 0 = no MoE layers
    tie_embeddings: bool = False  # LM head shares the token embedding matrix
    aux_loss_weight: float = 1.0  # multiplies the sum of every MoE layer's (weighted) aux loss
    init_std: float = 0.02
    # LM training loss over chunks of this many tokens, each chunk's logits recomputed in the
    # backward, so the [tokens, vocab] logits never live whole (moekit.model.loss); 0 = off
    loss_chunk_tokens: int = 0

    def __post_init__(self) -> None:
        build_nested(self, "model.")
        # the MoE layer always works at the model width: one number to change, not two
        if self.moe.d_model != self.d_model:
            object.__setattr__(self, "moe", replace(self.moe, d_model=self.d_model))
        if self.vocab_size is not None and self.d_in is not None:
            raise ValueError("model.vocab_size / model.d_in: set one of them, not both")
        for name in ("vocab_size", "d_in", "d_out"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        if self.d_in is not None and self.d_out is None:
            raise ValueError("model.d_out must be set for continuous inputs (model.d_in)")
        for name in ("d_model", "n_layers", "n_heads", "max_seq_len", "d_ff"):
            _at_least(name, getattr(self, name), 1)
        _at_least("moe_every", self.moe_every, 0)
        _at_least("loss_chunk_tokens", self.loss_chunk_tokens, 0)
        kv = self.kv_heads
        if kv < 1 or self.n_heads % kv:
            raise ValueError(f"model.n_kv_heads={self.n_kv_heads} must divide n_heads")
        if self.head_size is not None:
            if not isinstance(self.head_size, int) or self.head_size < 2 or self.head_size % 2:
                raise ValueError(f"model.head_size={self.head_size!r} must be an even integer >= 2")
        elif self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"model.d_model={self.d_model} must be n_heads={self.n_heads} x an even head size"
            )
        if self.norm not in NORMS:
            raise ValueError(f"model.norm={self.norm!r} is not one of {NORMS}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"model.qk_norm={self.qk_norm!r} is not one of {QK_NORMS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation={self.activation!r} is not one of {ACTIVATIONS}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        for name in ("norm_eps", "rope_theta", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be > 0")
        if self.aux_loss_weight < 0:
            raise ValueError(f"model.aux_loss_weight={self.aux_loss_weight} must be >= 0")
        if self.tie_embeddings and (self.d_in is not None or self.d_out is not None):
            raise ValueError("model.tie_embeddings needs a token model with an LM head")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads if self.head_size is None else self.head_size

    @property
    def out_dim(self) -> int:
        return self.d_out if self.d_out is not None else self.vocab_size  # type: ignore[return-value]

    def is_moe_layer(self, i: int) -> bool:
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0

    def dense_equivalent(self) -> ModelConfig:
        """A dense model whose FFNs have the active expert width of this one's MoE layers.

        Active FFN width of an MoE layer = (k + n_shared_experts) * d_hidden (router excluded).
        """
        m = self.moe
        width = (m.k + m.n_shared_experts) * m.d_hidden
        if self.moe_every == 0:
            return replace(self)
        if self.moe_every != 1 and width != self.d_ff:
            raise ValueError("dense_equivalent needs moe_every=1 or d_ff equal to the MoE width")
        return replace(self, moe_every=0, d_ff=width, activation=m.expert.activation)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return from_dict(cls, data, "ModelConfig field(s)")
