"""What training adds to a checkpoint of `moekit.model.store`: its own state and run config.

    checkpoints/step-0000100/  ...the model store's files...  trainer_state.pt  run.json

The trainer state (step, optimizer, scaler, RNG) holds tensors and plain Python values only and
loads with `weights_only=True`: a state file holding anything else is refused, never unpickled.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moekit.errors import CheckpointError
from moekit.model.store import (
    RUN_FILE,
    WEIGHTS_FILE,
    checkpoint_name,
    intact_checkpoints,
    is_checkpoint_dir,
    pick_checkpoint,
    prune_checkpoints,
    write_checkpoint,
)
from moekit.model.transformer import Transformer
from moekit.train.config import RunConfig

if TYPE_CHECKING:
    from moekit.train.parallelism import SingleProcess

STATE_FILE = "trainer_state.pt"
_STATE_KEYS = {"step", "optimizer", "scaler", "rng"}
log = logging.getLogger(__name__)


def save_checkpoint(
    ckpt_root: str | Path,
    model: Transformer,
    state: dict[str, Any] | None,
    step: int,
    metric: float | None = None,
    texts: dict[str, str] | None = None,
) -> Path:
    """`write_checkpoint` with the trainer's state beside the model (none when None)."""

    def write_state(directory: Path) -> None:
        if state is not None:
            torch.save(state, directory / STATE_FILE)

    return write_checkpoint(ckpt_root, model, step, metric, texts, extra=write_state)


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
        prune_checkpoints(self.root, self.keep_last, self.keep_best, intact=path)
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


def run_config_of(path: str | Path) -> RunConfig:
    """The run config saved beside a checkpoint; a missing or broken one is named."""
    file = pick_checkpoint(path) / RUN_FILE
    try:
        return RunConfig.from_dict(json.loads(file.read_bytes()))
    except FileNotFoundError:
        raise CheckpointError(
            f"{file}: missing (eval needs a checkpoint written by training)"
        ) from None
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: not a run config ({err})") from None
