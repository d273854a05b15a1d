"""Kernel configs as data: one JSON per device, keyed by shape class, read by a cached loader.

A shape class is the number of sorted rows per expert (S / E), which decides the tile height:
decode batches want short tiles and many CTAs along N (each expert's weights are streamed
once), prefill batches want large square tiles. Each class layers, last wins: the defaults
below, the file shipped for the device, then the user's own tuning from `moekit bench tune`
(`cache_dir()`). A device with neither file gets the defaults and one warning naming the fix.
"""

from __future__ import annotations

import json
import logging
import os
from functools import cache
from pathlib import Path

import torch

_LOG = logging.getLogger(__name__)
_DIR = Path(__file__).with_name("configs")

# Per shape class: block_m (shared by every tiled kernel of one call, it defines the schedule),
# then per kernel: block sizes, GROUP_M swizzle, num_warps, num_stages.
_GEMM = ("block_n", "block_k", "group_m", "num_warps", "num_stages")
DEFAULT: dict[str, dict] = {
    "decode": {
        "block_m": 16,
        "up": dict(zip(_GEMM, (32, 128, 1, 4, 4), strict=True)),
        "down": dict(zip(_GEMM, (32, 128, 1, 4, 4), strict=True)),
        "dh": dict(zip(_GEMM, (32, 128, 1, 4, 4), strict=True)),
        "dx": dict(zip(_GEMM, (64, 64, 1, 4, 4), strict=True)),
        "wgrad": {"block_m": 32, "block_p": 64, "block_q": 64, "num_warps": 4, "num_stages": 3},
    },
    "small": {
        "block_m": 32,
        "up": dict(zip(_GEMM, (64, 128, 1, 4, 4), strict=True)),
        "down": dict(zip(_GEMM, (64, 128, 1, 4, 4), strict=True)),
        "dh": dict(zip(_GEMM, (64, 128, 1, 4, 4), strict=True)),
        "dx": dict(zip(_GEMM, (64, 64, 1, 4, 4), strict=True)),
        "wgrad": {"block_m": 32, "block_p": 64, "block_q": 64, "num_warps": 4, "num_stages": 3},
    },
    "batch": {
        "block_m": 64,
        "up": dict(zip(_GEMM, (128, 64, 1, 4, 4), strict=True)),
        "down": dict(zip(_GEMM, (128, 64, 1, 4, 4), strict=True)),
        "dh": dict(zip(_GEMM, (64, 128, 1, 4, 4), strict=True)),
        "dx": dict(zip(_GEMM, (64, 64, 1, 4, 4), strict=True)),
        "wgrad": {"block_m": 32, "block_p": 64, "block_q": 64, "num_warps": 4, "num_stages": 3},
    },
    "medium": {
        "block_m": 64,
        "up": dict(zip(_GEMM, (128, 64, 8, 4, 4), strict=True)),
        "down": dict(zip(_GEMM, (128, 64, 8, 4, 4), strict=True)),
        "dh": dict(zip(_GEMM, (128, 64, 8, 4, 4), strict=True)),
        "dx": dict(zip(_GEMM, (128, 64, 8, 4, 4), strict=True)),
        "wgrad": {"block_m": 64, "block_p": 128, "block_q": 128, "num_warps": 8, "num_stages": 3},
    },
    "large": {
        "block_m": 128,
        "up": dict(zip(_GEMM, (128, 64, 8, 8, 4), strict=True)),
        "down": dict(zip(_GEMM, (128, 64, 8, 8, 4), strict=True)),
        "dh": dict(zip(_GEMM, (128, 64, 8, 8, 4), strict=True)),
        "dx": dict(zip(_GEMM, (128, 64, 8, 8, 4), strict=True)),
        "wgrad": {"block_m": 64, "block_p": 128, "block_q": 128, "num_warps": 8, "num_stages": 3},
    },
}

# Under the CPU interpreter every block is the smallest tl.dot accepts: it is slow per element.
INTERPRETER: dict = {
    "block_m": 16,
    **{k: dict(zip(_GEMM, (16, 16, 2, 1, 1), strict=True)) for k in ("up", "down", "dh", "dx")},
    "wgrad": {"block_m": 16, "block_p": 16, "block_q": 16, "num_warps": 1, "num_stages": 1},
}


def shape_class(n_rows: int, n_experts: int) -> str:
    """Bucket by rows per expert (S / E), the quantity that decides the tile height."""
    per_expert = n_rows / max(n_experts, 1)
    if per_expert <= 8:
        return "decode"
    if per_expert <= 20:
        return "small"
    if per_expert <= 48:
        return "batch"
    if per_expert <= 128:
        return "medium"
    return "large"


def device_key(device: torch.device) -> str:
    """File stem for a device: its name with spaces and dashes as underscores."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return "".join(c if c.isalnum() else "_" for c in name)


def cache_dir() -> Path:
    """Where `moekit bench tune` writes this user's configs: $MOEKIT_CACHE_DIR/triton, else
    ~/.cache/moekit/triton."""
    root = os.environ.get("MOEKIT_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "moekit") / "triton"


def _read(path: Path) -> dict:
    """A tuned JSON file as {class: config}; ValueError naming the file when it is not one."""
    try:
        tuned = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"tuned config file {path} is not valid JSON: {err}") from err
    if not isinstance(tuned, dict) or not all(isinstance(v, dict) for v in tuned.values()):
        raise ValueError(f"tuned config file {path} must map shape classes to configs")
    return tuned


@cache
def tuned_table(key: str) -> dict:
    """Every shape class for one device (cached): defaults < shipped file < the user's cache."""
    files = [p for p in (_DIR / f"{key}.json", cache_dir() / f"{key}.json") if p.exists()]
    if not files:
        _LOG.warning(
            "no tuned triton MoE configs for %s: using defaults; `moekit bench tune` tunes this "
            "GPU and writes %s",
            key,
            cache_dir() / f"{key}.json",
        )
    table = {cls: dict(cfg) for cls, cfg in DEFAULT.items()}
    for path in files:
        for cls, cfg in _read(path).items():
            if cls in table:
                table[cls].update(cfg)
    return table


def for_dtype(cfg: dict, dtype: torch.dtype) -> dict:
    """fp32 tiles take twice the shared memory: shorter K steps and at most 3 stages."""
    if dtype != torch.float32:
        return cfg
    return dict(cfg, num_stages=min(cfg["num_stages"], 3), block_k=min(cfg["block_k"], 32))


def config_key(device: torch.device, n_rows: int, n_experts: int) -> str:
    """Which config a call uses: "interpreter" on the CPU, else its shape class."""
    if device.type == "cpu" or os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreter"
    return shape_class(n_rows, n_experts)


def config_by_key(device: torch.device, key: str) -> dict:
    """The config for a key from `config_key` (the custom ops take the key, not the dict)."""
    if key == "interpreter":
        return INTERPRETER
    return tuned_table(device_key(device))[key]
