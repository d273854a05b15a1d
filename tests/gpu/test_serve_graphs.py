"""The server's decode on CUDA: graph-captured steps give the tokens of eager steps.

"graphs" replays the bucketed computation that "static" runs without capture, so those two
agree bit for bit; "eager" attends only to the live rows' pages and is unpadded, so in float32
with well-separated logits it gives the same tokens too, as does `Transformer.generate`.
"""

from __future__ import annotations

import pytest
import torch
from tests.serve.conftest import serve_all

import moekit
from moekit.model import ModelConfig, Transformer
from moekit.serve.config import EngineConfig
from moekit.serve.sequence import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _model(dtype: torch.dtype) -> Transformer:
    torch.manual_seed(0)
    moe = moekit.MoEConfig(d_model=128, d_hidden=128, n_experts=8, k=2)
    cfg = ModelConfig(
        vocab_size=256,
        d_model=128,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=96,
        moe=moe,
        init_std=0.3,  # spread logits: greedy picks do not hang on rounding
    )
    return Transformer(cfg).to("cuda", dtype).eval()


def _serve(model: Transformer, mode: str, prompts, params) -> tuple[list[list], dict]:
    cfg = EngineConfig(max_batch=8, page_size=16, decode_mode=mode, prefill_chunk=32)
    return serve_all(model, cfg, prompts, params)


def _prompts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (n,), generator=g) for n in (1, 7, 20, 33, 64, 90, 12)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sampled", [False, True])
def test_captured_decode_equals_static_bit_for_bit(dtype, sampled):
    model = _model(dtype)
    params = SamplingParams(max_new_tokens=40, temperature=0.8 if sampled else 0.0, seed=9)
    graphs, info = _serve(model, "graphs", _prompts(), params)
    static, _ = _serve(model, "static", _prompts(), params)
    assert info["mode"] == "graphs" and info["fallback"] is None
    assert info["graphs"] == info["buckets"] == [1, 2, 4, 8]
    assert graphs == static


def test_captured_decode_equals_eager_and_generate_in_float32():
    model = _model(torch.float32)
    params = SamplingParams(max_new_tokens=40)
    graphs, info = _serve(model, "graphs", _prompts(), params)
    eager, _ = _serve(model, "eager", _prompts(), params)
    assert info["graphs"] and graphs == eager
    for p, got in zip(_prompts(), graphs, strict=True):  # windows slide past max_seq_len too
        want = model.generate(p[None].cuda(), 40)[0, len(p) :].tolist()
        assert got == want
