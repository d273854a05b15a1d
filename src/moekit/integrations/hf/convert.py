"""Hugging Face MoE checkpoints into moekit and back, one loop over the family's links.

`read_hf` reads an HF directory (config.json + safetensors, sharded or not) into a moekit
`ModelConfig` and state dict; `hf_to_moekit` writes that as a moekit checkpoint with the
tokenizer beside it, `load_hf` returns the model. `moekit_to_hf` writes a moekit model whose
architecture maps onto a family as a checkpoint `AutoModelForCausalLM.from_pretrained` loads.
Weights keep their dtype unless `dtype` says otherwise. Directories are written next to
their destination and renamed into place, so a failed conversion leaves nothing half-written.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from moekit.integrations.hf.families import (
    Family,
    UnsupportedCheckpoint,
    family_for,
    family_of,
)
from moekit.integrations.hf.tokenizer import copy_tokenizer_files
from moekit.integrations.hf.weights import HFWeights, write_hf_weights
from moekit.model.config import ModelConfig
from moekit.model.store import WEIGHTS_FILE, read_config, save_model_files
from moekit.model.transformer import Transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_PER_EXPERT = re.compile(r"model\.layers\.(\d+)\.\w+\.experts\.(\d+)\.(\w+)\.weight")
# weights HF checkpoints may hold that a model rebuilds itself (old RoPE caches)
_DERIVED = re.compile(r".*rotary_emb\.inv_freq")


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "Hugging Face conversion needs transformers: pip install 'moekit[hf]'"
        ) from err
    return transformers


def read_hf_config(hf_dir: str | Path) -> Any:
    """The transformers config of an HF directory, refusing unsupported model types first."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (is this a Hugging Face checkpoint?)")
    family_of(json.loads(path.read_text()).get("model_type"))
    return _transformers().AutoConfig.from_pretrained(str(hf_dir))


class _Source:
    """HF tensors by their save_pretrained names, also from the fused layout of transformers 5.

    transformers 5 holds experts fused (mlp.experts.gate_up_proj [E, 2H, D], down_proj
    [E, D, H]) and may write them so; per-expert names are then read as slices of those.
    """

    def __init__(self, weights: HFWeights, expert_weights: tuple[str, ...]) -> None:
        self.weights, self.expert_weights = weights, expert_weights
        self.read: set[str] = set()
        self._fused: dict[str, Tensor] = {}  # the current layer's fused tensors

    def _fused_tensor(self, name: str) -> Tensor:
        if name not in self._fused:
            if len(self._fused) >= 2:
                self._fused.clear()
            self._fused[name] = self.weights.get(name)
            self.read.add(name)
        return self._fused[name]

    def __call__(self, name: str) -> Tensor:
        if name in self.weights:
            self.read.add(name)
            return self.weights.get(name)
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        block = f"model.layers.{layer}.mlp."
        match = _PER_EXPERT.fullmatch(name)
        if match and f"{block}experts.gate_up_proj" in self.weights:
            e, which = int(match.group(2)), self.expert_weights.index(match.group(3))
            if which == 2:
                return self._fused_tensor(f"{block}experts.down_proj")[e]
            gate_up = self._fused_tensor(f"{block}experts.gate_up_proj")[e]  # [2H, D]
            return gate_up.chunk(2)[which]
        if name.endswith(".gate.weight") and layer is not None:
            alias = f"{block}gate.weight"  # Mixtral's router under transformers 5's name
            if alias in self.weights:
                self.read.add(alias)
                return self.weights.get(alias)
        raise UnsupportedCheckpoint(f"weight {name!r} is missing from the checkpoint")


def read_hf(
    hf_dir: str | Path, max_seq_len: int | None = None
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """(moekit config, moekit state dict) of an HF checkpoint directory; nothing left unread."""
    hf = read_hf_config(hf_dir)
    family = family_of(hf.model_type)
    cfg = family.model_config(hf, max_seq_len)
    with HFWeights(hf_dir) as weights:
        source = _Source(weights, family.expert_weights)
        state = {
            link.ours: link.join([source(n) for n in link.theirs]) for link in family.links(cfg)
        }
        tied_head = {"lm_head.weight"} if cfg.tie_embeddings else set()
        left = sorted(n for n in weights.names() - source.read - tied_head if not _DERIVED.match(n))
    if left:
        shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        raise UnsupportedCheckpoint(f"{family.model_type}: weights moekit would ignore: {shown}")
    if cfg.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    return cfg, state


def _cast(state: dict[str, Tensor], dtype: str | torch.dtype | None) -> dict[str, Tensor]:
    """Floating-point tensors in dtype ('fp32', 'bf16', 'fp16' or a torch.dtype); None keeps."""
    if dtype is None:
        return state
    target = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if target not in DTYPES.values():
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    return {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}


@contextmanager
def _staged(out: str | Path) -> Iterator[Path]:
    """A fresh directory beside `out`, renamed to `out` when the block succeeds."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def hf_to_moekit(
    hf_dir: str | Path,
    out: str | Path,
    max_seq_len: int | None = None,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write an HF checkpoint as a moekit checkpoint (config.json, model.safetensors, tokenizer).

    max_seq_len defaults to the model's max_position_embeddings (serving sizes its KV slots by
    it: pass less for a smaller server); dtype defaults to the checkpoint's own.
    """
    cfg, state = read_hf(hf_dir, max_seq_len)
    with torch.device("meta"):  # shapes only: the converted tensors become the parameters
        model = Transformer(cfg)
    model.load_state_dict(_cast(state, dtype), strict=True, assign=True)
    with _staged(out) as tmp:
        save_model_files(model, tmp)
        copy_tokenizer_files(hf_dir, tmp)
    return Path(out)


def load_hf(
    hf_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    max_seq_len: int | None = None,
) -> Transformer:
    """A moekit `Transformer` (eval mode) with the weights of an HF MoE checkpoint.

    dtype None keeps the checkpoint's dtype. The tokenizer is `load_tokenizer(hf_dir)`.
    """
    cfg, state = read_hf(hf_dir, max_seq_len)
    state = _cast(state, dtype)
    with torch.device(device):
        model = Transformer(cfg).to(state["embed.weight"].dtype)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _load_as_saved(ckpt: str | Path) -> Transformer:
    """A moekit checkpoint with its weights in the dtype they were saved in (no float32 copy)."""
    cfg = read_config(ckpt)
    with torch.device("meta"):
        model = Transformer(cfg)
    state = load_file(Path(ckpt) / WEIGHTS_FILE)
    if cfg.tie_embeddings and "head.weight" not in state:
        state["head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    return model


def hf_state(model: Transformer) -> tuple[Family, dict[str, Tensor]]:
    """(family, HF tensors by save_pretrained name) of a moekit model; refuses unmappable ones."""
    family = family_for(model.cfg)
    state = model.state_dict()
    tensors = {}
    for link in family.links(model.cfg):
        tensors.update(zip(link.theirs, link.split(state[link.ours].detach()), strict=True))
    return family, tensors


def moekit_to_hf(
    src: str | Path | Transformer,
    out: str | Path,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write a moekit model (or checkpoint directory) as an HF checkpoint of its family.

    The tokenizer files of a checkpoint directory go along; UnsupportedCheckpoint names what
    keeps an architecture from every family.
    """
    model, src_dir = (src, None) if isinstance(src, Transformer) else (_load_as_saved(src), src)
    family, tensors = hf_state(model)
    tensors = _cast(tensors, dtype)
    config = _transformers().AutoConfig.for_model(family.model_type, **family.hf_config(model.cfg))
    config.dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    with _staged(out) as tmp:
        config.save_pretrained(str(tmp))
        write_hf_weights(tensors, tmp, max_shard_bytes)
        if src_dir is not None:
            copy_tokenizer_files(src_dir, tmp)
    return Path(out)
