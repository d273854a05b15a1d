"""Checkpoint directories, written atomically, with best-K / latest-N retention.

    checkpoints/step-0000100/  config.json  model.safetensors  trainer_state.pt  meta.json
                               run.json  manifest.json

A checkpoint is written into a hidden temporary directory and renamed into place, so an
interrupted write never leaves a directory that looks complete; readers skip hidden ones.
Its manifest (size and sha256 of every file) is written last: a checkpoint damaged later is
named and skipped, and the newest intact one is used instead. The trainer state holds
tensors and plain Python values only and loads with `weights_only=True`: a state file
holding anything else is refused, never unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moekit.errors import CheckpointError
from moekit.model.io import CONFIG_FILE, WEIGHTS_FILE, save_model_files
from moekit.model.manifest import MANIFEST_FILE, verify_manifest, write_manifest
from moekit.model.transformer import Transformer

if TYPE_CHECKING:
    from moekit.train.parallelism import SingleProcess

STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"
RUN_FILE = "run.json"  # the run config, beside each checkpoint and in the run directory
_STATE_KEYS = {"step", "optimizer", "scaler", "rng"}
_STEP_NAME = re.compile(r"step-(\d+)")
log = logging.getLogger(__name__)


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def save_checkpoint(
    ckpt_root: str | Path,
    model: Transformer,
    state: dict[str, Any] | None,
    step: int,
    metric: float | None = None,
    texts: dict[str, str] | None = None,
) -> Path:
    """Write a complete checkpoint for `step` under ckpt_root and return its path.

    `texts` are further files (name -> content), written inside the same atomic rename.
    """
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


def load_trainer_state(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A trainer state file as written by `save_checkpoint`; refuses anything else by name.

    Loaded with `weights_only=True`, so a file holding other objects (a pickle from elsewhere
    that would run code) raises ValueError and nothing in it is executed.
    A file that cannot be read at all (truncated, zeroed) raises CheckpointError, a ValueError.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except OSError:
        raise
    except Exception as err:  # any unreadable state is refused the same way
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found is None:  # not a foreign object: the file is damaged
            raise CheckpointError(
                f"{path}: refused, not a readable trainer state ({type(err).__name__})"
            ) from None
        raise ValueError(
            f"{path}: refused, not a trainer state of tensors and plain values "
            f"(it names {found.group(1)})"
        ) from None
    if not isinstance(state, dict) or not state.keys() >= _STATE_KEYS:
        raise ValueError(f"{path}: refused, not a trainer state (needs keys {sorted(_STATE_KEYS)})")
    return state


class Checkpointer:
    """One run's checkpoints: every rank calls `save`; the main rank writes them and prunes."""

    def __init__(
        self,
        root: str | Path,
        run: dict[str, Any],
        keep_last: int,
        keep_best: int,
        parallel: SingleProcess,
    ) -> None:
        self.root, self.run = Path(root), run
        self.keep_last, self.keep_best = keep_last, keep_best
        self.parallel = parallel

    def save(
        self, model: nn.Module, state: dict[str, Any], step: int, metric: float | None
    ) -> Path:
        """Write weights (the dense model), trainer state and run config for `step`."""
        dense = self.parallel.dense(model)  # collective when the experts are sharded
        if not self.parallel.is_main:
            return self.root / checkpoint_name(step)
        run = json.dumps(self.run, indent=2) + "\n"
        path = save_checkpoint(self.root, dense, state, step, metric, texts={RUN_FILE: run})
        prune_checkpoints(self.root, self.keep_last, self.keep_best)
        return path

    def restore(
        self, path: str | Path, model: nn.Module, device: torch.device
    ) -> tuple[Path, dict[str, Any]]:
        """Load the latest intact checkpoint's weights into `model`; return it and its state.

        A damaged checkpoint (by its manifest, or unreadable when it has none) is named in a
        one-line warning and the one before it is tried. Weights that do not fit the run's
        model config raise a ValueError naming the parameter and both shapes.
        """
        for ckpt in intact_checkpoints(path, "latest"):
            try:
                state = load_trainer_state(ckpt / STATE_FILE, device)
                if state["optimizer"] is None:
                    raise ValueError(
                        f"{ckpt} holds no optimizer state (written with parallel.ep > 1 by an "
                        "older moekit) and cannot be resumed"
                    )
                self.parallel.load_weights(model, ckpt / WEIGHTS_FILE, device)
            except CheckpointError as err:
                if is_checkpoint_dir(path):  # the one named: nothing to fall back to
                    raise
                log.warning("skipping a damaged checkpoint: %s", err)
                continue
            return ckpt, state
        raise CheckpointError(f"no intact checkpoint to resume in {path}: every one is damaged")
