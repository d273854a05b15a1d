"""Argument checks shared by the knowledge store and the recorder.

Every check raises ``ValueError`` whose message starts with the offending argument's name, so
callers (and tests) can tell which input was wrong.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch


def check_int(name: str, value: Any, *, minimum: int | None = None, allow_none: bool = False):
    """Return ``value`` as a Python int (or None when allowed); bools and floats are rejected."""
    if type(value) is int and (minimum is None or value >= minimum):
        return value  # fast path for bulk loads
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be an int, got None")
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def as_matrix(name: str, value: Any, dim: int, *, batched: bool) -> torch.Tensor:
    """Convert embeddings to a float32 CPU tensor: [dim] -> [1, dim] or [N, dim] -> [N, dim].

    Rejects wrong shapes, NaN/inf and all-zero rows (cosine similarity is undefined for them).
    """
    try:
        if isinstance(value, torch.Tensor):
            x = value.detach().to(device="cpu", dtype=torch.float32)
        else:
            x = torch.as_tensor(np.asarray(value, dtype=np.float32))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric: {exc}") from None
    want = 2 if batched else 1
    if x.ndim != want or x.shape[-1] != dim:
        shape = "[N, dim]" if batched else "[dim]"
        raise ValueError(f"{name} must have shape {shape} with dim={dim}, got {tuple(x.shape)}")
    x_ND = x.reshape(-1, dim).contiguous()  # [N, D]
    if not bool(torch.isfinite(x_ND).all()):
        raise ValueError(f"{name} contains NaN or inf")
    if x_ND.shape[0] and not bool((x_ND.abs().amax(dim=1) > 0).all()):
        raise ValueError(f"{name} contains an all-zero vector (cosine similarity is undefined)")
    return x_ND


def normalise(x_ND: torch.Tensor) -> torch.Tensor:
    """Unit-normalise rows; norms are taken in float64 so the result does not depend on batching."""
    x64_ND = x_ND.double()
    return (x64_ND / x64_ND.norm(dim=1, keepdim=True)).float()  # [N, D]


def check_experts(value: Any) -> tuple[int, ...]:
    """Return a sorted tuple of distinct non-negative expert ids."""
    if isinstance(value, torch.Tensor | np.ndarray):
        value = value.tolist()
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValueError(f"experts must be an iterable of ints, got {type(value).__name__}")
    out = set()
    for e in value:
        out.add(check_int("experts", e, minimum=0))
    return tuple(sorted(out))


def check_metadata(value: Any) -> dict[str, Any]:
    """Return a JSON round-tripped copy of a metadata dict (None -> {})."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError("metadata must be a dict with str keys")
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata must be JSON-serialisable: {exc}") from None


def per_item(name: str, value: Any, n: int) -> Sequence[Any]:
    """Broadcast a scalar (or None) to ``n`` items, or check a sequence has length ``n``."""
    if value is None or isinstance(value, int | np.integer | dict):
        return [value] * n
    if isinstance(value, torch.Tensor | np.ndarray):
        value = value.tolist()
    if not isinstance(value, Sequence) or len(value) != n:
        raise ValueError(f"{name} must be a scalar or a sequence of length {n}")
    return value


def check_threshold(value: Any) -> float:
    """dedup_threshold must lie in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
        raise ValueError(f"dedup_threshold must be a float, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"dedup_threshold must be in (0, 1], got {value}")
    return value
