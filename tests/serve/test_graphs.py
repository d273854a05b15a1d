"""DecodeStep on CPU: the bucketed, padded decode that CUDA graphs hold equals the eager one."""

import torch

from moekit.serve.config import EngineConfig
from moekit.serve.graphs import DecodeStep, buckets_for
from moekit.serve.paged import PagedKVCache
from moekit.serve.sequence import SamplingParams

from .conftest import make_model, serve_all


def test_buckets():
    assert buckets_for(1) == (1,)
    assert buckets_for(32) == (1, 2, 4, 8, 16, 32)
    assert buckets_for(48) == (1, 2, 4, 8, 16, 32, 48)
    assert buckets_for(200) == (1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 200)


def _rows_filled(model, lengths):
    kv = PagedKVCache(model, n_rows=8, n_pages=64, page=4, cache_pages=0)
    rows = [kv.open(kv.pages_for(64)) for _ in lengths]
    for row, n in zip(rows, lengths, strict=True):
        x = torch.randint(0, 256, (1, n))
        kv.extend([row], [n])
        model(x, cache=kv.view([row], [n]))
        kv.commit([row], [n])
    return kv, rows


def test_static_padded_step_equals_eager_and_padding_leaves_no_trace():
    torch.manual_seed(0)
    model = make_model()
    outs, states = {}, {}
    for mode in ("eager", "static"):
        torch.manual_seed(1)
        kv, rows = _rows_filled(model, [3, 11, 6])
        inputs = torch.randint(0, 256, (9, 1))
        counts = torch.zeros(2, 4, dtype=torch.long)
        step = DecodeStep(model, kv, inputs, counts, max_batch=8, mode=mode)
        live = [rows[2], rows[0], rows[1]]  # any order; 3 rows pad to the bucket of 4
        kv.extend(live, [1, 1, 1])
        outs[mode] = step(live)
        states[mode] = (kv.lengths.clone(), counts.clone(), [k.clone() for k in kv.keys])
    torch.testing.assert_close(outs["static"], outs["eager"], atol=1e-5, rtol=1e-5)
    assert torch.equal(outs["static"].argmax(-1), outs["eager"].argmax(-1))
    lengths, counts, keys = states["static"]
    assert torch.equal(lengths, states["eager"][0])  # the pad row stayed empty
    assert lengths.tolist() == [4, 12, 7, 0, 0, 0, 0, 0, 0]
    assert torch.equal(counts, states["eager"][1]) and counts.sum(1).tolist() == [6, 6]
    for a, b in zip(keys, states["eager"][2], strict=True):  # only the scratch page differs
        torch.testing.assert_close(a[4:], b[4:], atol=1e-4, rtol=1e-4)


def test_graphs_fall_back_on_cpu_with_a_reason():
    model = make_model()
    kv = PagedKVCache(model, n_rows=2, n_pages=40, page=4, cache_pages=0)
    step = DecodeStep(
        model, kv, torch.zeros(3, 1, dtype=torch.long), torch.zeros(2, 4), 2, "graphs"
    )
    assert step.mode == "eager" and "CUDA" in step.fallback and not step.graphs


def test_engine_static_mode_gives_the_eager_tokens():
    model = make_model()
    torch.manual_seed(2)
    prompts = [torch.randint(0, 256, (n,)) for n in (2, 9, 17, 30, 5)]
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=40, seed=5)

    def run(mode):
        cfg = EngineConfig(max_batch=4, page_size=4, decode_mode=mode)
        return serve_all(model, cfg, prompts, params)

    static, info = run("static")
    eager, _ = run("eager")
    assert info["mode"] == "static" and info["buckets"] == [1, 2, 4]
    assert static == eager
