"""SlotCache: rows of different lengths advanced by the model's own forward."""

import pytest
import torch

from moekit.model import AttentionCache, KVCache
from moekit.serve.slots import SlotCache

from .conftest import make_model


def _filled(model, lengths):
    """A SlotCache whose row r holds the prefill of a random prompt of lengths[r]."""
    prompts = [torch.randint(0, 256, (n,)) for n in lengths]
    slots = SlotCache(model, len(lengths) + 1)  # one spare row
    for row, p in enumerate(prompts):
        cache = model.new_cache()
        model(p[None], cache=cache)
        slots.load(row, cache)
    return slots, prompts


def test_both_caches_implement_the_protocol():
    model = make_model()
    assert isinstance(SlotCache(model, 2), AttentionCache)
    assert isinstance(KVCache(2), AttentionCache)


@pytest.mark.parametrize("new", [1, 3])
def test_model_forward_on_slots_matches_full_forward(new):
    torch.manual_seed(0)
    model = make_model()
    lengths = [3, 17, 9, 1]
    slots, prompts = _filled(model, lengths)
    assert torch.equal(slots.positions(4, 1, slots.device)[:, 0], torch.tensor(lengths))
    nxt = torch.randint(0, 256, (4, new))
    out = model(nxt, cache=slots)  # [4, new, V]: rows never see each other
    for row, p in enumerate(prompts):
        ref = model(torch.cat([p, nxt[row]])[None])
        torch.testing.assert_close(out.out[row], ref.out[0, -new:], atol=1e-4, rtol=1e-4)
        moe_ref = ref.layers[1].routing.experts[-new:]  # [new, k]
        assert torch.equal(out.layers[1].routing.experts.view(4, new, -1)[row], moe_ref)
    grown = [n + new for n in lengths]
    assert slots.lengths[:4].tolist() == grown and [slots.length(r) for r in range(4)] == grown
    assert slots.length(4) == 0 and slots.lengths[4] == 0  # rows past the batch untouched


def test_move_and_round_trip_keep_a_row():
    torch.manual_seed(0)
    model = make_model()
    slots, prompts = _filled(model, [5, 8])
    slots.move(1, 0)  # row 0 leaves; row 1 takes its place
    assert slots.length(0) == 8 and slots.lengths[0] == 8
    back = slots.to_kv_cache(0)
    ref = model.new_cache()
    model(prompts[1][None], cache=ref)
    assert len(back) == 8
    for i in range(model.cfg.n_layers):
        assert torch.equal(back.layer(i)[0], ref.layer(i)[0])
        assert torch.equal(back.layer(i)[1], ref.layer(i)[1])


def test_a_full_row_is_refused_before_anything_is_written():
    model = make_model(max_seq_len=8)
    slots, _ = _filled(model, [8, 2])
    keys = [k.clone() for k in slots.keys]
    with pytest.raises(ValueError, match="no room"):
        model(torch.zeros(2, 1, dtype=torch.long), cache=slots)
    assert all(torch.equal(a, b) for a, b in zip(keys, slots.keys, strict=True))
    assert slots.lengths[:2].tolist() == [8, 2]
    too_long = model.new_cache()
    model(torch.zeros(1, 9, dtype=torch.long), cache=too_long)
    with pytest.raises(ValueError, match="max_len"):
        slots.load(1, too_long)
