"""Operand checks for the kernel launchers: metadata only (never a host sync).

A kernel reads whatever its pointers and strides say, so a wrong operand gives silent garbage
rather than an error; each launcher checks its operands here first and a mistake raises
ValueError naming the operand.
"""

from __future__ import annotations

from typing import NoReturn

import torch
from torch import Tensor

FLOATS = (torch.float16, torch.bfloat16, torch.float32)  # what tl.dot takes
WEIGHTS = (*FLOATS, torch.float64)  # gate weights are read once and widened to fp32
INDICES = (torch.int32, torch.int64)


def check_operand(
    name: str,
    t: Tensor,
    shape: tuple[int | None, ...],
    dtypes: tuple[torch.dtype, ...],
    device: torch.device,
    contiguous: bool = False,
) -> None:
    """ValueError naming `name` unless t has `shape` (None: any size), one of `dtypes`, lives
    on `device` and, when `contiguous`, is laid out as the flat array the kernel indexes."""
    got = t.shape
    fits = len(got) == len(shape)  # a plain loop: this runs on every launch, keep it cheap
    if fits:
        for g, w in zip(got, shape, strict=True):
            if w is not None and g != w:
                fits = False
    if not fits or t.dtype not in dtypes or t.device != device:
        _explain(name, t, shape, dtypes, device)
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the kernel indexes it as a flat array)")


def _explain(
    name: str,
    t: Tensor,
    shape: tuple[int | None, ...],
    dtypes: tuple[torch.dtype, ...],
    device: torch.device,
) -> NoReturn:
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the other operands on {device}")
    want = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ")"
    raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
