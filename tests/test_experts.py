"""Expert options: FFN dropout (training only, unbiased) and the init schemes' spreads."""

import math

import pytest
import torch
from tests.oracle import make_moe, rel

import moekit
from moekit.config import from_dict


def _dropping_moe(p: float, **fields) -> moekit.MoE:
    return make_moe(expert=moekit.ExpertConfig(dropout=p), **fields)


def test_dropout_from_yaml_keys_and_bounds():
    cfg = from_dict(moekit.MoEConfig, {"expert": {"dropout": 0.1}}, "MoEConfig field(s)")
    assert cfg.expert.dropout == 0.1
    for bad in (-0.1, 1.0, True, "0.1"):
        with pytest.raises(ValueError, match="expert.dropout"):
            moekit.ExpertConfig(dropout=bad)


def test_dropout_is_off_in_eval_and_matches_the_reference():
    torch.manual_seed(0)
    moe = _dropping_moe(0.5, n_shared_experts=1, fallback="dense", capacity_factor=0.5)
    x = torch.randn(12, 8, dtype=torch.float64)
    assert moe.experts.fused
    y, _ = moe(x)
    y_ref, _ = moekit.reference.moe_forward(moe, x)
    assert rel(y, y_ref) < 1e-10
    moe.train()
    with pytest.raises(ValueError, match="expert.dropout"):
        moekit.reference.moe_forward(moe, x)


def test_dropout_in_training_runs_expert_by_expert_and_is_unbiased():
    """Training drops hidden units (outputs vary, gradients flow); since w2 is linear the mean
    of many training outputs is the eval output."""
    torch.manual_seed(1)
    moe = _dropping_moe(0.3)
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    y_eval, _ = moe(x)
    moe.train()
    assert not moe.experts.fused
    y1, _ = moe(x)
    y2, _ = moe(x)
    assert not torch.equal(y1, y2)
    y1.sum().backward()
    assert moe.experts.w1.grad is not None and x.grad is not None
    with torch.no_grad():
        mean = torch.stack([moe(x)[0] for _ in range(4000)]).mean(0)
    assert rel(mean, y_eval) < 0.05


def test_zero_dropout_in_training_keeps_the_fused_path():
    torch.manual_seed(2)
    moe = _dropping_moe(0.0).train()
    x = torch.randn(6, 8, dtype=torch.float64)
    assert moe.experts.fused
    assert torch.equal(moe(x)[0], moe(x)[0])


# the std each scheme's formula gives a [fan_in, fan_out] matrix (uniform(-b, b): b / sqrt(3))
EXPECTED_STD = {
    "normal": lambda i, o, std, L: std,
    "xavier": lambda i, o, std, L: math.sqrt(6.0 / (i + o)) / math.sqrt(3.0),
    "xavier_normal": lambda i, o, std, L: math.sqrt(2.0 / (i + o)),
    "kaiming_uniform": lambda i, o, std, L: math.sqrt(6.0 / i) / math.sqrt(3.0),
    "kaiming_normal": lambda i, o, std, L: math.sqrt(2.0 / i),
}


@pytest.mark.parametrize("init", [*EXPECTED_STD, "depth_scaled"])
def test_each_init_gives_the_std_of_its_formula(init):
    """w1 [E, D, 2H] and w2 [E, H, D] (swiglu) have the std the scheme's formula says, within
    sampling error (the std of ~50k draws is within 1% of the true one by far)."""
    torch.manual_seed(4)
    D, H, L = 64, 96, 3
    cfg = moekit.ExpertConfig(init=init, init_std=0.05, n_layers=L)
    experts = moekit.experts.Experts(4, D, H, cfg)
    for name, w, (fan_in, fan_out) in (("w1", experts.w1, (D, 2 * H)), ("w2", experts.w2, (H, D))):
        if init == "depth_scaled":
            want = 0.05 if name == "w1" else 0.05 / math.sqrt(2 * L)
        else:
            want = EXPECTED_STD[init](fan_in, fan_out, 0.05, L)
        assert abs(w.std().item() / want - 1) < 0.03, (name, w.std().item(), want)
        assert abs(w.mean().item()) < 0.03 * want
    if init in ("xavier", "kaiming_uniform"):  # bounded: b = sqrt(3) * std
        bound = math.sqrt(3.0) * EXPECTED_STD[init](D, 2 * H, 0.05, L)
        assert experts.w1.abs().max().item() <= bound


def test_unknown_init_names_the_choices():
    with pytest.raises(ValueError, match="expert.init.*kaiming_normal"):
        moekit.ExpertConfig(init="orthogonal")
