"""Training: the step, the loop, optimiser groups and schedule, checkpoints, logs, live view.

Names load on first use, so `moekit.train.step` (torch only) serves `moekit.System`, demos
and tasks without importing the trainer and everything it needs.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Precision": "moekit.train.step",
    "RunConfig": "moekit.train.config",
    "StepConfig": "moekit.train.step",
    "StepLoss": "moekit.train.step",
    "TrainConfig": "moekit.train.config",
    "TrainStep": "moekit.train.step",
    "Trainer": "moekit.train.trainer",
    "list_checkpoints": "moekit.model.store",
    "model_config_for": "moekit.train.trainer",
    "pick_checkpoint": "moekit.model.store",
    "read_log": "moekit.train.logging",
    "save_checkpoint": "moekit.train.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moekit.train' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
