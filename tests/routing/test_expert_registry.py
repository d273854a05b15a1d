"""`@register_expert`: an expert MLP defined outside moekit, checked against the oracle."""

import pytest
import torch
from tests.oracle import against_reference, make_moe, rel
from torch import nn

import moekit
from moekit.experts import Experts, available_experts


@moekit.register_expert("scaled_test")
class ScaledExperts(Experts):
    """The MLP with a learned output scale per expert: math the fused backends do not have."""

    def __init__(self, n_experts, d_model, d_hidden, cfg):
        super().__init__(n_experts, d_model, d_hidden, cfg)
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, n_experts))

    def expert(self, e, x_ND):
        return super().expert(e, x_ND) * self.scale[e]


@moekit.register_expert("xavier_test")
class XavierExperts(Experts):
    """Only the initialisation differs: still computed by the backends."""

    def __init__(self, n_experts, d_model, d_hidden, cfg):
        super().__init__(n_experts, d_model, d_hidden, cfg)
        nn.init.xavier_uniform_(self.w1)


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_custom_expert_matches_the_reference_with_every_gradient(capacity_factor):
    torch.manual_seed(0)
    moe = make_moe(
        expert=moekit.ExpertConfig(kind="scaled_test", bias=True), capacity_factor=capacity_factor
    )
    assert isinstance(moe.experts, ScaledExperts) and not moe.experts.fused
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    layer, ref = against_reference(moe, x)
    assert rel(layer.y, ref.y) < 1e-12
    assert rel(layer.grad_x, ref.grad_x) < 1e-12
    assert "experts.scale" in layer.grads and set(layer.grads) == set(ref.grads)
    for name, grad in ref.grads.items():
        assert rel(layer.grads[name], grad) < 1e-12, name


def test_built_in_and_weight_only_kinds_run_on_the_backends():
    assert "mlp" in available_experts()
    assert make_moe().experts.fused
    moe = make_moe(expert=moekit.ExpertConfig(kind="xavier_test"))
    assert isinstance(moe.experts, XavierExperts) and moe.experts.fused


def test_kind_survives_the_config_round_trip():
    cfg = moekit.MoEConfig(d_model=8, d_hidden=4, expert=moekit.ExpertConfig(kind="scaled_test"))
    assert moekit.MoEConfig.from_dict(cfg.to_dict()).expert.kind == "scaled_test"


def test_bad_kinds_and_registrations_are_refused():
    with pytest.raises(ValueError, match="expert.kind='nope'"):
        moekit.MoE(moekit.MoEConfig(expert=moekit.ExpertConfig(kind="nope")))
    with pytest.raises(ValueError, match="subclass of moekit.experts.Experts"):
        moekit.register_expert("module_test")(nn.Linear)
    with pytest.raises(ValueError, match="already registered"):
        moekit.register_expert("scaled_test")(XavierExperts)
