import math

import pytest

import moekit
from moekit.model import ModelConfig, Transformer
from moekit.train import TrainConfig
from moekit.train.optim import build_optimizer, lr_factor, set_lr


def test_groups_split_router_experts_rest_and_skip_decay():
    moe = moekit.MoEConfig(
        d_model=16,
        d_hidden=8,
        n_experts=4,
        k=1,
        expert=moekit.ExpertConfig(bias=True),
        n_shared_experts=1,
    )
    model = Transformer(ModelConfig(vocab_size=10, d_model=16, n_heads=2, n_layers=2, moe=moe))
    cfg = TrainConfig(lr=1e-3, router_lr=1e-4, expert_lr=2e-3, weight_decay=0.1)
    opt = build_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = 0
    for g in opt.param_groups:
        for p in g["params"]:
            name = names[id(p)]
            seen += 1
            expected = "router" if ".router." in name else "experts" if ".ffn." in name else "rest"
            assert g["name"] == expected, name
            no_decay = "norm" in name or name.endswith(("b1", "b2", "bias"))
            assert g["weight_decay"] == (0.0 if no_decay else 0.1), name
    assert seen == len(names)
    lrs = set_lr(opt, 10_000, cfg)  # past the end: every group at its floor
    assert lrs == pytest.approx({"router": 1e-5, "experts": 2e-4, "rest": 1e-4})


def test_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    values = [lr_factor(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
