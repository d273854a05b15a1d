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


def save_model_files(model: Transformer, directory: str | Path) -> None:
    """Write config.json and model.safetensors into an existing directory."""
    directory = Path(directory)
    payload = {"format": "moekit.transformer", "version": 1, "model": model.cfg.to_dict()}
    (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    save_model(model, str(directory / WEIGHTS_FILE))  # handles tied (shared) weights


def read_config(path: str | Path) -> ModelConfig:
    data = json.loads((Path(path) / CONFIG_FILE).read_text())
    return ModelConfig.from_dict(data["model"])


def load(path: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """Rebuild a model from a checkpoint directory (config.json + model.safetensors).

    A run directory is accepted too: its best checkpoint (lowest validation metric), or
    the latest one when none was evaluated.
    """
    path = Path(path)
    if not (path / CONFIG_FILE).exists():
        from moekit.train.checkpoint import pick_checkpoint

        path = pick_checkpoint(path)
    model = Transformer(read_config(path))
    missing, unexpected = load_model(model, str(path / WEIGHTS_FILE), device=str(device))
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match config (missing {missing}, unexpected {unexpected})"
        )
    return model.to(device).eval()
