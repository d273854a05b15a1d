import pytest

import moekit


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"k": 9, "n_experts": 8}, "k="),
        ({"n_experts": 0}, "n_experts="),
        ({"capacity_factor": 0.0}, "capacity_factor="),
        ({"capacity_factor": -1.0}, "capacity_factor="),
        ({"d_hidden": 0}, "d_hidden="),
        ({"d_model": 0}, "d_model="),
        ({"backend": "cuda-magic"}, "backend="),
        ({"fallback": "drop"}, "fallback="),
        ({"n_shared_experts": -1}, "n_shared_experts="),
    ],
)
def test_bad_layer_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        moekit.MoEConfig(**kwargs)


def test_unknown_names_list_allowed_values():
    with pytest.raises(ValueError, match=r"router.kind='nope'.*'topk'"):
        moekit.RouterConfig(kind="nope")
    with pytest.raises(ValueError, match=r"expert.activation='tanh'.*'swiglu'"):
        moekit.ExpertConfig(activation="tanh")
    with pytest.raises(ValueError, match="router.noise="):
        moekit.RouterConfig(noise="pink")
    with pytest.raises(ValueError, match="'grouped_mm'"):
        moekit.MoEConfig(backend="nope")


def test_group_limits_are_checked_against_the_layer():
    with pytest.raises(ValueError, match="router.n_groups=3"):
        moekit.MoEConfig(n_experts=8, router=moekit.RouterConfig(n_groups=3, topk_groups=1))
    with pytest.raises(ValueError, match="router.topk_groups"):
        moekit.RouterConfig(n_groups=2, topk_groups=3)
    with pytest.raises(ValueError, match="k=4 exceeds"):
        moekit.MoEConfig(n_experts=8, k=4, router=moekit.RouterConfig(n_groups=4, topk_groups=1))


def test_capacity_formula_and_dict_round_trip():
    cfg = moekit.MoEConfig(n_experts=8, k=2, capacity_factor=1.25)
    assert cfg.capacity(100) == 32  # ceil(1.25 * 100 * 2 / 8) = ceil(31.25)
    assert moekit.MoEConfig(capacity_factor=None).capacity(100) is None
    again = moekit.MoEConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ValueError, match="unknown MoEConfig field"):
        moekit.MoEConfig.from_dict({"d_model": 8, "n_expert": 2})
