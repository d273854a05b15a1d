"""Checkpoint files, the one home of their format: all `moekit.load` and a resumed run need.

    checkpoints/step-0000100/  config.json  model.safetensors  meta.json  run.json
                               manifest.json  (+ what the trainer adds: trainer_state.pt)

A checkpoint is written into a hidden temporary directory and renamed into place, so an
interrupted write never leaves a directory that looks complete; readers skip hidden ones.
Its manifest (size and sha256 of every file) is written last: a checkpoint damaged later is
named and skipped, and the newest intact one is used instead. Loading refuses, in one line
naming the file, what would otherwise load wrong or crash: a missing, truncated or unparsable
file, weights that do not fit the config (the parameter and both shapes), NaN or infinity.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from moekit.errors import CheckpointError
from moekit.model.config import ModelConfig
from moekit.model.manifest import MANIFEST_FILE, verify_manifest, write_manifest
from moekit.model.transformer import Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
RUN_FILE = "run.json"  # the run config, beside each checkpoint and in the run directory
_STEP_NAME = re.compile(r"step-(\d+)")
log = logging.getLogger(__name__)
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


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def write_checkpoint(
    ckpt_root: str | Path,
    model: Transformer,
    step: int,
    metric: float | None = None,
    texts: dict[str, str] | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a complete checkpoint for `step` under ckpt_root and return its path.

    `texts` (name -> content) and what `extra(directory)` writes (e.g. the trainer's state)
    land inside the same atomic rename and are vouched for by the same manifest.
    """
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_model_files(model, tmp)
        if extra is not None:
            extra(tmp)
        for name, text in (texts or {}).items():
            (tmp / name).write_text(text)
        meta = {"step": step, "metric": metric}
        (tmp / META_FILE).write_text(json.dumps(meta) + "\n")
        _fsync_dir(tmp)
        write_manifest(tmp)  # last: it vouches for every file above
        if final.exists():  # same step written again (e.g. emergency after a periodic save)
            old = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def list_checkpoints(ckpt_root: str | Path) -> list[dict[str, Any]]:
    """Complete checkpoints, oldest first: [{'path', 'step', 'metric'}].

    One whose meta.json is unreadable is listed by its directory name, with no metric.
    """
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.name.startswith(".") or not (d / META_FILE).exists():
            continue
        try:
            meta = json.loads((d / META_FILE).read_bytes())
            step, metric = int(meta["step"]), meta.get("metric")
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
            named = _STEP_NAME.fullmatch(d.name)
            if named is None:
                continue
            step, metric = int(named.group(1)), None
        metric = metric if isinstance(metric, int | float) else None
        found.append({"path": d, "step": step, "metric": metric})
    return sorted(found, key=lambda c: c["step"])


def _newest_intact(ckpts: list[dict[str, Any]]) -> Path | None:
    """The highest-step checkpoint that its manifest vouches for (damaged newer ones skipped)."""
    for c in reversed(ckpts):
        try:
            verify_manifest(c["path"])
        except CheckpointError:
            continue
        return c["path"]
    return None


def prune_checkpoints(
    ckpt_root: str | Path, keep_last: int, keep_best: int, intact: Path | None = None
) -> None:
    """Delete checkpoints that are neither among the latest N nor the best K by metric.

    The newest intact checkpoint always stays, so a damaged newer one (skipped by a resume)
    never costs the run its last good state; `intact`: one known good (just written), else
    the manifests are checked newest first.
    """
    ckpts = list_checkpoints(ckpt_root)
    keep = {c["path"] for c in ckpts[-keep_last:]} if keep_last else set()
    good = Path(intact) if intact is not None else _newest_intact(ckpts)
    if good is not None:
        keep.add(good)
    scored = sorted((c for c in ckpts if c["metric"] is not None), key=lambda c: c["metric"])
    keep |= {c["path"] for c in scored[:keep_best]}
    for c in ckpts:
        if c["path"] not in keep:
            shutil.rmtree(c["path"], ignore_errors=True)
    for stale in Path(ckpt_root).glob(".tmp-*"):  # left by a killed writer
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


def is_checkpoint_dir(path: str | Path) -> bool:
    """Whether `path` is one checkpoint (not a run or checkpoints/ directory)."""
    path = Path(path)
    return any((path / name).exists() for name in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE))


def _by_preference(path: Path, which: str) -> list[Path]:
    """A run's (or checkpoints/ dir's) checkpoints, the one to use first.

    which='best': by validation metric, then those without one, latest first; 'latest': by step.
    """
    if which not in ("best", "latest"):
        raise ValueError(f"which={which!r} is not one of 'best', 'latest'")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    ckpts = list_checkpoints(root)
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint found in {path}")
    latest_first = [c["path"] for c in reversed(ckpts)]
    if which == "latest":
        return latest_first
    scored = sorted((c for c in ckpts if c["metric"] is not None), key=lambda c: c["metric"])
    best = [c["path"] for c in scored]
    return best + [p for p in latest_first if p not in best]


def intact_checkpoints(path: str | Path, which: str = "best") -> Iterator[Path]:
    """Checkpoints of a checkpoint, run or checkpoints/ dir, preferred first, each verified
    against its manifest; a damaged one is named in a one-line warning and skipped.

    A checkpoint dir given directly is verified and yielded, or its damage raised.
    """
    path = Path(path)
    if is_checkpoint_dir(path):
        verify_manifest(path)
        yield path
        return
    for ckpt in _by_preference(path, which):
        try:
            verify_manifest(ckpt)
        except CheckpointError as err:
            log.warning("skipping a damaged checkpoint: %s", err)
            continue
        yield ckpt


def pick_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A checkpoint dir from a checkpoint, a run dir or a checkpoints/ dir.

    which='best': lowest validation metric (latest if none has one); 'latest': highest step.
    A damaged checkpoint is skipped (one warning line) for the next by the same order.
    """
    ckpt = next(intact_checkpoints(path, which), None)
    if ckpt is None:
        raise CheckpointError(f"no intact checkpoint in {path}: every one is damaged")
    return ckpt


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
