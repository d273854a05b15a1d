"""A saved checkpoint and saved MoE layers reproduce their saved outputs and gradients, bit for bit.

tests/data/golden/ was written by its make_golden.py from a tree known to be right. On CPU in
float32 a refactor must not change a single bit of what is computed; regenerate the files only
for an intended change of behaviour, and say so in the commit.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moekit

GOLDEN = Path(__file__).parent / "data" / "golden"


def _load_maker():
    """make_golden.py as a module: the test runs exactly what produced the files."""
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_golden = _load_maker()
LAYER_CONFIGS = json.loads((GOLDEN / "layers.json").read_text())
BACKENDS = ("torch", "grouped_mm")


@pytest.fixture(autouse=True)
def same_threads():
    """The thread count the files were written with (a split reduction may round differently)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(make_golden.THREADS)
    yield
    torch.set_num_threads(threads)


def _with_prefix(tensors: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def assert_bitwise(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    differ = []
    for name, want in expected.items():
        have = got[name].detach()
        if have.dtype != want.dtype or not torch.equal(have, want):
            gap = (
                (have.double() - want.double()).abs().max().item()
                if have.shape == want.shape
                else "shape"
            )
            differ.append(f"{name}: {have.dtype} vs {want.dtype}, max |diff| {gap}")
    assert not differ, "differs from the golden files:\n" + "\n".join(differ)


def test_model_checkpoint_reproduces_outputs_and_gradients():
    model = moekit.load(GOLDEN / "model")
    expected = load_file(GOLDEN / "model_expected.safetensors")
    tokens, targets = expected.pop("tokens"), expected.pop("targets")
    assert model.moe_layers() and model.cfg.moe.router.kind == "topk"
    assert_bitwise(make_golden.run_model(model, tokens, targets), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(LAYER_CONFIGS))
def test_layer_reproduces_outputs_gradients_and_buffers(case, backend):
    expected = _with_prefix(load_file(GOLDEN / "layers_expected.safetensors"), f"{case}.")
    want = _with_prefix(expected, f"{backend}.")
    if not want:
        pytest.skip(f"no golden outputs recorded for backend {backend!r}")
    if backend not in make_golden.layer_backends():
        pytest.skip(f"backend {backend!r} does not run on CPU float32 here")
    cfg = moekit.MoEConfig.from_dict(LAYER_CONFIGS[case])
    state = _with_prefix(load_file(GOLDEN / "layers.safetensors"), f"{case}.")
    moe = make_golden.build_layer(cfg, backend, state)
    assert_bitwise(make_golden.run_layer(moe, expected["x"]), want)


def test_golden_files_cover_every_router_and_layer_option():
    kinds = {cfg["router"]["kind"] for cfg in LAYER_CONFIGS.values()}
    assert kinds >= {"topk", "sigmoid", "expert_choice", "sinkhorn", "attention"}
    assert any(cfg["capacity_factor"] is not None for cfg in LAYER_CONFIGS.values())
    assert any(cfg["n_shared_experts"] > 0 for cfg in LAYER_CONFIGS.values())
    total = sum(p.stat().st_size for p in GOLDEN.rglob("*") if p.is_file())
    assert total < 200_000, f"golden files grew to {total} bytes"
