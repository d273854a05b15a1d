"""Training: the loop, optimiser groups and schedule, checkpoints, logs and live view."""

from moekit.train.checkpoint import list_checkpoints, pick_checkpoint, save_checkpoint
from moekit.train.config import RunConfig, TrainConfig
from moekit.train.logging import read_log
from moekit.train.trainer import Trainer, model_config_for

__all__ = [
    "RunConfig",
    "TrainConfig",
    "Trainer",
    "list_checkpoints",
    "model_config_for",
    "pick_checkpoint",
    "read_log",
    "save_checkpoint",
]
