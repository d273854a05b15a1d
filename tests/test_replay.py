"""moekit.replay on the CPU: buckets, packing, when a layer may replay; CUDA runs in tests/gpu."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moekit
from moekit.replay import GraphReplay, _pack, _unpack, bucket


@given(st.integers(1, 4096))
def test_bucket_is_the_next_power_of_two(rows):
    b = bucket(rows)
    assert b >= rows and b & (b - 1) == 0 and b < 2 * rows


def test_pack_then_unpack_returns_every_output_cut_to_the_rows():
    g = torch.Generator().manual_seed(0)
    outputs = (
        torch.randn(8, 5, generator=g, dtype=torch.bfloat16),
        None,
        torch.randint(-1, 9, (8, 3), generator=g),
        torch.rand(8, 3, generator=g) > 0.5,
        torch.randn(8, 7, generator=g, dtype=torch.float64),
    )
    packed, slots = _pack(outputs)
    assert packed.dtype == torch.uint8
    assert all(s is None or s.offset % 16 == 0 for s in slots)
    back = _unpack(packed.clone(), slots, rows=6)
    assert back[1] is None
    for want, got in zip(outputs, back, strict=True):
        if want is not None:
            assert got.dtype == want.dtype
            assert torch.equal(got, want[:6])


def test_graphs_are_not_used_on_the_cpu_or_while_autograd_records():
    replay = GraphReplay(lambda x: (x,), lambda: (), max_rows=64)
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert not replay.usable(x)
    assert not replay.usable(x)


def _cfg(**kw):
    return moekit.MoEConfig(d_model=16, d_hidden=8, n_experts=4, k=2, **kw)


@pytest.mark.parametrize(
    "kw, replays",
    [
        ({}, True),
        ({"router": {"kind": "sigmoid"}}, True),
        ({"capacity_factor": 1.0}, False),
        ({"router": {"kind": "expert_choice"}}, False),
        ({"router": {"kind": "sinkhorn"}}, False),
        ({"debug": True}, False),
        ({"track_coactivation": True}, False),
        ({"dedup_threshold": 0.9}, False),
        ({"graph_max_tokens": 0}, False),
    ],
)
def test_only_layers_whose_tokens_route_alone_replay(kw, replays):
    assert (moekit.MoE(_cfg(**kw)).replay is not None) is replays


def test_graph_max_tokens_must_be_a_non_negative_integer():
    with pytest.raises(ValueError, match="graph_max_tokens"):
        _cfg(graph_max_tokens=-1)


def test_a_copied_layer_starts_with_no_graphs_of_its_own():
    moe = moekit.MoE(_cfg())
    moe.replay._entries[("fake",)] = None
    clone = copy.deepcopy(moe)
    assert clone.replay is not moe.replay and not clone.replay._entries
    assert clone.replay.fn.__self__ is clone
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(clone(x)[0], moe(x)[0])
