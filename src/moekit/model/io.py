"""Model files: `config.json` + `model.safetensors`, all `moekit.load` needs.

Loading refuses, in one line naming the file, what would otherwise load wrong or crash: a
missing, truncated or unparsable file, weights that do not fit the config (the parameter
and both shapes), and NaN or infinity in the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from moekit.errors import CheckpointError
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
    """The model config in a checkpoint directory; a missing or broken file is refused by name."""
    file = Path(path) / CONFIG_FILE
    try:
        data = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: not readable JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{file}: not a moekit model config (no 'model' section)")
    try:
        return ModelConfig.from_dict(data["model"])
    except (TypeError, ValueError, KeyError, AttributeError) as err:  # wrong or odd values
        raise CheckpointError(f"{file}: {_one_line(err)}") from None


def check_weights_fit(model: nn.Module, weights: str | Path) -> None:
    """Refuse, in one line, a weights file that does not fit `model`: the first parameter of a
    different shape (both shapes named), or one the model lacks. Reads the header only."""
    weights = Path(weights)
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except FileNotFoundError:
        raise CheckpointError(f"{weights}: missing") from None
    except Exception as err:  # safetensors raises its own error type for every header problem
        raise CheckpointError(f"{weights}: unreadable ({_one_line(err)})") from None
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    for name, shape in shapes.items():
        if name not in expected:
            raise ValueError(f"{weights}: holds {name}, which the model config does not make")
        if shape != expected[name]:
            raise ValueError(
                f"{weights} does not fit the model config: {name} has shape {shape} in the "
                f"file, {expected[name]} in the model"
            )


def load_weights(model: nn.Module, weights: str | Path, device: str | torch.device) -> None:
    """Copy a safetensors file into `model` after `check_weights_fit`; every parameter needed."""
    check_weights_fit(model, weights)
    try:
        missing, _ = load_model(model, str(weights), strict=False, device=str(device))
    except Exception as err:  # data shorter than the header promises, and the like
        raise CheckpointError(f"{weights}: unreadable ({_one_line(err)})") from None
    if missing:
        first, more = sorted(missing)[0], len(missing) - 1
        extra = f" and {more} more" if more else ""
        raise ValueError(f"{weights}: lacks {first}{extra}, which the model config makes")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _sync_first_nonfinite(model: nn.Module) -> str | None:
    """Name of the first floating-point parameter or buffer holding NaN or infinity.

    NOTE: host sync, once per load (not in a forward pass).
    """
    tensors = [(n, t) for n, t in model.state_dict().items() if t.is_floating_point()]
    if not tensors:
        return None
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]).cpu()
    bad = [n for (n, _), ok in zip(tensors, finite, strict=True) if not ok]
    return bad[0] if bad else None


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
    the latest one when none was evaluated; a damaged one is skipped for the next. `dtype`
    ('bf16', 'fp16', 'fp32') casts every weight as it loads; None builds float32 whatever the
    file holds. A checkpoint that is damaged (its manifest names the file), incomplete, does
    not fit its config or holds NaN raises a one-line ValueError.
    """
    from moekit.train.checkpoint import pick_checkpoint

    return load_files(pick_checkpoint(path), device, dtype)


def load_files(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> Transformer:
    """`load` of one checkpoint directory whose manifest was already checked."""
    target = parse_dtype(dtype)
    path = Path(path)
    with torch.device(device):  # built where it runs: a large model never passes the CPU
        model = Transformer(read_config(path))
    if target is not None:
        model.to(target)
    load_weights(model, path / WEIGHTS_FILE, device)
    bad = _sync_first_nonfinite(model)
    if bad is not None:
        raise CheckpointError(f"{path / WEIGHTS_FILE}: {bad} holds NaN or infinity")
    return model.to(device).eval()
