"""The kernel and tuning benchmarks take the named model shapes and any E, K, D, H a user has."""

import pytest

from moekit.backends.triton.configs import shape_class
from moekit.bench.kernels import SHAPES, KernelsBench, shape_of
from moekit.bench.tune import _TUNE_T, TuneBench, tune_tokens


def test_named_and_spelled_out_shapes():
    assert shape_of("mixtral") == SHAPES["mixtral"]
    assert shape_of("e64k8d2048h1024") == {"E": 64, "K": 8, "D": 2048, "H": 1024}
    assert TuneBench(shapes=["qwen3-30b-a3b", "e64k8d2048h1024"]).shapes[1] == "e64k8d2048h1024"


@pytest.mark.parametrize("bad", ["gpt4", "e8k16d64h64", "e0k1d64h64", "E8K2D64H64"])
def test_bad_shapes_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="shapes"):
        KernelsBench(shapes=[bad])
    with pytest.raises(ValueError, match="shapes"):
        TuneBench(shapes=[bad])


@pytest.mark.parametrize("cls", list(_TUNE_T))
@pytest.mark.parametrize("name", ["e64k8d2048h1024", "e8k2d4096h14336", "e256k8d7168h2048"])
def test_a_spelled_out_shape_is_tuned_inside_each_class(cls, name):
    shape = shape_of(name)
    rows = tune_tokens(cls, name) * shape["K"]
    assert shape_class(rows, shape["E"]) == cls


@pytest.mark.parametrize("cls", list(_TUNE_T))
@pytest.mark.parametrize("name", list(SHAPES))
def test_named_shapes_are_tuned_inside_each_class(cls, name):
    shape = shape_of(name)
    assert shape_class(tune_tokens(cls, name) * shape["K"], shape["E"]) == cls
