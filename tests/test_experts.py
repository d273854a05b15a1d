"""Expert options: FFN dropout (training only, unbiased) and the init schemes' spreads."""

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
