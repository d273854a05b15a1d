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
# then per kernel: block sizes, GROUP_M swizzle, num_warps, num_stages. Data, like the tuned
# files beside it: the configs any GPU starts from.
DEFAULT: dict[str, dict] = json.loads((_DIR / "defaults.json").read_text())
_GEMM = ("block_n", "block_k", "group_m", "num_warps", "num_stages")

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


@cache
def device_key(device: torch.device) -> str:
    """File stem for a device: its name with spaces and dashes as underscores (cached: every
    launch looks its config up)."""
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


# Shared memory per CTA on H100 / H200 (the opt-in maximum): the staged operand tiles of a
# config are kept within it by estimate; the compiler's scratch on top of them is left to the
# launch-time retry (`launch.launch_with_retry`).
SMEM_LIMIT = 232448
SMEM_TILE_BUDGET = SMEM_LIMIT
MIN_BLOCK = 16  # the smallest tile side tl.dot accepts


def gemm_smem(cfg: dict, block_m: int, a_bytes: int, b_bytes: int, n_b: int = 1) -> int:
    """Bytes of shared memory the pipelined operand tiles of a grouped GEMM take: num_stages
    copies of the A tile [block_m, block_k] and of n_b B tiles [block_k, block_n] (2 when
    gated), each in its own operand's element size (B is staged before it is cast to A's)."""
    per_stage = block_m * cfg["block_k"] * a_bytes + n_b * cfg["block_k"] * cfg["block_n"] * b_bytes
    return cfg["num_stages"] * per_stage


def wgrad_smem(cfg: dict, left_bytes: int, right_bytes: int) -> int:
    """Bytes of the pipelined tiles of the weight-gradient kernel: num_stages copies of the
    left [block_m, block_p] and right [block_m, block_q] tiles."""
    per_stage = cfg["block_m"] * (cfg["block_p"] * left_bytes + cfg["block_q"] * right_bytes)
    return cfg["num_stages"] * per_stage


def fit_smem(cfg: dict, estimate, shrink: tuple[str, ...], budget: int = SMEM_TILE_BUDGET) -> dict:
    """cfg with num_stages lowered to 2, then the `shrink` block sizes halved in turn (never
    below MIN_BLOCK), then num_stages 1, until estimate(cfg) fits the budget."""
    cfg = dict(cfg)
    while estimate(cfg) > budget:
        if cfg["num_stages"] > 2:
            cfg["num_stages"] -= 1
            continue
        big = [k for k in shrink if cfg[k] > MIN_BLOCK]
        if big:
            cfg[big[0]] //= 2
        elif cfg["num_stages"] > 1:
            cfg["num_stages"] = 1
        else:
            break
    return cfg


def for_dtype(
    cfg: dict,
    dtype: torch.dtype,
    b_dtype: torch.dtype | None = None,
    block_m: int | None = None,
    n_b: int = 1,
) -> dict:
    """A GEMM config for these operand dtypes: fp32 A tiles take twice the shared memory
    (shorter K steps and at most 3 stages); with block_m, stages and blocks are also lowered
    until the staged tiles of A (dtype) and B (b_dtype, default dtype: fp32 master weights
    under bf16 autocast are staged as fp32) fit `SMEM_TILE_BUDGET`."""
    if dtype == torch.float32:
        cfg = dict(cfg, num_stages=min(cfg["num_stages"], 3), block_k=min(cfg["block_k"], 32))
    if block_m is None:
        return cfg
    a_bytes = dtype.itemsize
    b_bytes = (b_dtype or dtype).itemsize
    fitted = fit_smem(
        cfg, lambda c: gemm_smem(c, block_m, a_bytes, b_bytes, n_b), ("block_k", "block_n")
    )
    return cfg if fitted == cfg else fitted


def for_wgrad(cfg: dict, left_dtype: torch.dtype, right_dtype: torch.dtype) -> dict:
    """A wgrad config whose staged tiles fit `SMEM_TILE_BUDGET` for these operand dtypes."""
    lb, rb = left_dtype.itemsize, right_dtype.itemsize
    fitted = fit_smem(cfg, lambda c: wgrad_smem(c, lb, rb), ("block_m", "block_q", "block_p"))
    return cfg if fitted == cfg else fitted


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
