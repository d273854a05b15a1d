"""The bottom floor: capacity(), ExpertWeights.cast_like, and that it imports nothing of moekit."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import moekit
from moekit.types import ExpertWeights, capacity


@pytest.mark.parametrize(
    ("T", "k", "E", "cf", "want"),
    [
        (10, 2, 4, None, None),
        (10, 2, 4, 1.0, 5),
        (7, 2, 4, 1.0, 4),
        (0, 2, 4, 1.0, 0),
        (3, 1, 8, 0.1, 1),
    ],
)
def test_capacity_is_ceil_cf_t_k_over_e(T, k, E, cf, want):
    assert capacity(T, k, E, cf) == want
    if cf is not None:
        assert want == math.ceil(cf * T * k / E)


def test_the_config_and_expert_choice_use_the_same_capacity():
    from moekit.routing.expert_choice import expert_choice_capacity

    cfg = moekit.MoEConfig(d_model=8, d_hidden=8, n_experts=6, k=2, capacity_factor=1.3)
    for T in (0, 1, 5, 37):
        assert cfg.capacity(T) == capacity(T, 2, 6, 1.3)
        assert expert_choice_capacity(T, 2, 6, 1.3) == min(T, capacity(T, 2, 6, 1.3))


def _weights(bias: bool) -> ExpertWeights:
    w1, w2 = torch.randn(3, 4, 10, requires_grad=True), torch.randn(3, 5, 4, requires_grad=True)
    b1, b2 = (torch.randn(3, 10), torch.randn(3, 4)) if bias else (None, None)
    return ExpertWeights(w1, w2, b1, b2)


@pytest.mark.parametrize("bias", [False, True])
def test_cast_like_is_the_identity_without_autocast(bias):
    w = _weights(bias)
    assert w.cast_like(torch.randn(2, 4, dtype=torch.bfloat16)) is w


@pytest.mark.parametrize("bias", [False, True])
def test_cast_like_follows_x_under_autocast_and_keeps_gradients(bias):
    w = _weights(bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = w.cast_like(torch.randn(2, 4, dtype=torch.bfloat16))
        same = w.cast_like(torch.randn(2, 4))  # x autocast left in float32: weights stay
    assert all(t is None or t.dtype == torch.bfloat16 for t in cast.tensors)
    assert [t is None for t in cast.tensors] == [t is None for t in w.tensors]
    assert all(a is b for a, b in zip(same.tensors, w.tensors, strict=True))
    cast.w1.float().sum().backward()
    assert w.w1.grad is not None and w.w1.grad.dtype == torch.float32


def test_types_imports_nothing_from_moekit():
    tree = ast.parse(Path(moekit.types.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in names if m.split(".")[0] == "moekit"]
