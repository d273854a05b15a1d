"""Checkpoint directories, written atomically, with best-K / latest-N retention.

    checkpoints/step-0000100/  config.json  model.safetensors  trainer_state.pt  meta.json

A checkpoint is written into a hidden temporary directory and renamed into place, so an
interrupted write never leaves a directory that looks complete; readers skip hidden ones.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from moekit.model.io import CONFIG_FILE, save_model_files
from moekit.model.transformer import Transformer

STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def save_checkpoint(
    ckpt_root: str | Path,
    model: Transformer,
    state: dict[str, Any] | None,
    step: int,
    metric: float | None = None,
) -> Path:
    """Write a complete checkpoint for `step` under ckpt_root and return its path."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_model_files(model, tmp)
        if state is not None:
            torch.save(state, tmp / STATE_FILE)
        meta = {"step": step, "metric": metric}
        (tmp / META_FILE).write_text(json.dumps(meta) + "\n")
        _fsync_dir(tmp)
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
    """Complete checkpoints, oldest first: [{'path', 'step', 'metric'}]."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.name.startswith(".") or not (d / META_FILE).exists():
            continue
        meta = json.loads((d / META_FILE).read_text())
        found.append({"path": d, "step": meta["step"], "metric": meta.get("metric")})
    return sorted(found, key=lambda c: c["step"])


def prune_checkpoints(ckpt_root: str | Path, keep_last: int, keep_best: int) -> None:
    """Delete checkpoints that are neither among the latest N nor the best K by metric."""
    ckpts = list_checkpoints(ckpt_root)
    keep = {c["path"] for c in ckpts[-keep_last:]} if keep_last else set()
    scored = sorted((c for c in ckpts if c["metric"] is not None), key=lambda c: c["metric"])
    keep |= {c["path"] for c in scored[:keep_best]}
    for c in ckpts:
        if c["path"] not in keep:
            shutil.rmtree(c["path"], ignore_errors=True)
    for stale in Path(ckpt_root).glob(".tmp-*"):  # left by a killed writer
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


def pick_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A checkpoint dir from a checkpoint, a run dir or a checkpoints/ dir.

    which='best': lowest validation metric (latest if none has one); 'latest': highest step.
    """
    path = Path(path)
    if (path / CONFIG_FILE).exists():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    ckpts = list_checkpoints(root)
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint found in {path}")
    scored = [c for c in ckpts if c["metric"] is not None]
    if which == "best" and scored:
        return min(scored, key=lambda c: c["metric"])["path"]
    return ckpts[-1]["path"]


def rng_state() -> dict[str, Any]:
    """Every RNG the training step can touch, to restore on resume."""
    import random

    import numpy as np

    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
