"""Model files: `config.json` + `model.safetensors`, all `moekit.load` needs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from moekit.model.config import ModelConfig
from moekit.model.transformer import Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# names a weight dtype may be given by: the short ones the trainer uses, and torch's own
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def save_model_files(model: Transformer, directory: str | Path) -> None:
    """Write config.json and model.safetensors into an existing directory."""
    directory = Path(directory)
    payload = {"format": "moekit.transformer", "version": 1, "model": model.cfg.to_dict()}
    (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    save_model(model, str(directory / WEIGHTS_FILE))  # handles tied (shared) weights


def read_config(path: str | Path) -> ModelConfig:
    data = json.loads((Path(path) / CONFIG_FILE).read_text())
    return ModelConfig.from_dict(data["model"])


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'fp32' | 'bf16' | 'fp16' (or torch's names, or a torch.dtype) -> torch.dtype; None stays."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in DTYPES.values():
            raise ValueError(f"dtype={dtype} is not one of {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> Transformer:
    """Rebuild a model from a checkpoint directory (config.json + model.safetensors).

    A run directory is accepted too: its best checkpoint (lowest validation metric), or
    the latest one when none was evaluated. `dtype` ('bf16', 'fp16', 'fp32') casts every
    weight as it loads; None builds float32 whatever the file holds.
    """
    target = parse_dtype(dtype)
    path = Path(path)
    if not (path / CONFIG_FILE).exists():
        from moekit.train.checkpoint import pick_checkpoint

        path = pick_checkpoint(path)
    with torch.device(device):  # built where it runs: a large model never passes the CPU
        model = Transformer(read_config(path))
    if target is not None:
        model.to(target)
    missing, unexpected = load_model(model, str(path / WEIGHTS_FILE), device=str(device))
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match config (missing {missing}, unexpected {unexpected})"
        )
    return model.to(device).eval()
