"""The backend registry: names, "auto" by priority, and a forward that stays on its backend."""

from __future__ import annotations

import pytest
import torch
from tests.oracle import make_moe

import moekit
from moekit.backends import Backend, available_backends, get_backend, register_backend
from moekit.backends import base as registry
from moekit.backends.triton import TritonBackend

CPU = torch.device("cpu")


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="'nope'.*not one of"):
        get_backend("nope", CPU, torch.float32)


def test_built_in_backends_are_registered_once_each():
    assert set(available_backends()) == {"torch", "grouped_mm", "triton"}
    assert get_backend("torch", CPU, torch.float32) is get_backend("torch", CPU, torch.float32)


def test_a_name_cannot_be_taken_twice_nor_be_auto():
    for name in ("torch", "auto"):
        with pytest.raises(ValueError, match="already taken"):
            register_backend(name, 0)(type("Other", (Backend,), {}))


def test_auto_picks_the_highest_priority_supported_backend(monkeypatch):
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))
    registry._resolve.cache_clear()

    @register_backend("first", priority=100)
    class First(Backend):
        def unsupported(self, device, dtype):
            return None if dtype == torch.float64 else "float64 only"

    @register_backend("second", priority=50)
    class Second(Backend):
        auto_devices = ("cpu",)

    try:
        assert get_backend("auto", CPU, torch.float64).name == "first"
        assert get_backend("auto", CPU, torch.float32).name == "second"  # first refuses float32
        assert get_backend("auto", torch.device("meta"), torch.float32).name == "torch"
    finally:
        registry._resolve.cache_clear()


@pytest.mark.parametrize("backend", ["torch", "grouped_mm"])
def test_forward_calls_no_triton_function(backend, monkeypatch):
    """backend="torch" / "grouped_mm": routing, plan and experts never reach the triton backend."""

    def refuse(*args, **kwargs):
        raise AssertionError("a triton function was called")

    for method in ("forward", "per_slot", "make_plan", "select"):
        monkeypatch.setattr(TritonBackend, method, refuse)
    if moekit.backends.unsupported_reason(backend, CPU, torch.float32) is not None:
        pytest.skip(f"{backend} does not run here")
    moe = make_moe(
        "sigmoid", dtype=torch.float32, backend=backend, d_hidden=8, n_shared_experts=1
    )  # grouped_mm wants 16-byte strides
    x = torch.randn(9, 8, requires_grad=True)
    y, info = moe(x)
    y.sum().backward()
    with torch.no_grad():
        y_ref, _ = moekit.reference.moe_forward(moe, x)
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-6)


def test_the_layer_resolves_its_backend_once_per_device_and_dtype(monkeypatch):
    calls = []
    resolve = registry.get_backend

    def counting(*args):
        calls.append(args)
        return resolve(*args)

    monkeypatch.setattr(moekit.layer, "get_backend", counting)
    moe = make_moe(dtype=torch.float32)
    for _ in range(3):
        moe(torch.randn(5, 8))
    moe.double()
    moe(torch.randn(5, 8, dtype=torch.float64))
    assert [c[2] for c in calls] == [torch.float32, torch.float64]
