"""Router options every router shares: input norm, router dropout, expert dropout, schedules."""

import math

import pytest
import torch
import torch.nn.functional as F
from tests.oracle import against_reference, make_moe, rel

import moekit
from moekit.config import Schedule


def _rcfg(kind="topk", **kw):
    return moekit.RouterConfig(kind=kind, **kw)


# the input norm changes the math in eval too: the oracle applies it token by token
@pytest.mark.parametrize("pre_norm", ["rms", "layer"])
@pytest.mark.parametrize("kind", ["topk", "sigmoid", "attention", "sinkhorn"])
def test_pre_norm_matches_the_reference_with_gradients(kind, pre_norm):
    torch.manual_seed(0)
    moe = make_moe(_rcfg(kind, pre_norm=pre_norm))
    with torch.no_grad():
        moe.router.norm.weight.uniform_(0.5, 1.5)  # not the identity
        if pre_norm == "layer":
            moe.router.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 5, 8, dtype=torch.float64) * 3.0
    layer, ref = against_reference(moe, x)
    assert rel(layer.y, ref.y) < 1e-12
    assert torch.equal(layer.info.routing.experts, ref.info.routing.experts)
    assert rel(layer.grad_x, ref.grad_x) < 1e-10
    assert set(layer.grads) == set(ref.grads)
    assert "router.norm.weight" in layer.grads
    for name, grad in ref.grads.items():
        assert rel(layer.grads[name], grad) < 1e-10, name


@pytest.mark.parametrize("pre_norm", ["rms", "layer"])
def test_pre_norm_makes_routing_scale_invariant(pre_norm):
    torch.manual_seed(1)
    moe = make_moe(_rcfg(pre_norm=pre_norm))
    x = torch.randn(6, 8, dtype=torch.float64)
    small, large = moe.router(x * 100.0), moe.router(x * 1000.0)  # eps negligible
    assert torch.equal(small.experts, large.experts)
    torch.testing.assert_close(small.weights, large.weights, rtol=1e-6, atol=0)


def test_layer_pre_norm_is_torchs_layer_norm_with_its_own_weight_and_bias():
    """The router reads LayerNorm(x) (shift invariant too), float32 from bf16 input."""
    torch.manual_seed(3)
    moe = make_moe(_rcfg(pre_norm="layer"), dtype=torch.float32)
    assert {"router.norm.weight", "router.norm.bias"} <= set(moe.state_dict())
    ln = torch.nn.LayerNorm(8)
    with torch.no_grad():
        moe.router.norm.weight.uniform_(0.5, 1.5)
        moe.router.norm.bias.uniform_(-0.5, 0.5)
        ln.load_state_dict(moe.router.norm.state_dict())
    x = torch.randn(6, 8)
    routing = moe.router(x.bfloat16())
    assert routing.logits.dtype == torch.float32
    expected = F.linear(ln(x.bfloat16().float()), moe.router.weight)
    torch.testing.assert_close(routing.logits, expected)
    assert torch.equal(moe.router(x + 5.0).experts, moe.router(x).experts)


def test_no_options_no_new_parameters():
    moe = make_moe()
    assert moe.router.norm is None
    assert not any(name.startswith("router.norm") for name in moe.state_dict())
    assert not any(name.startswith("router.live_") for name, _ in moe.named_buffers())


def test_router_dropout_drops_the_routers_input_in_training_only():
    torch.manual_seed(2)
    moe = make_moe(_rcfg(dropout=0.5), dtype=torch.float32).train()
    x = torch.randn(16, 8)
    torch.manual_seed(7)
    routing = moe.router(x)
    torch.manual_seed(7)
    expected = F.linear(F.dropout(x, 0.5), moe.router.weight)
    assert torch.equal(routing.logits, expected)
    moe.eval()
    layer, ref = against_reference(moe, x.double().float())
    assert rel(layer.y, ref.y) < 1e-5  # eval: the reference, no dropout


def test_expert_dropout_empties_slots_and_rescales_survivors():
    torch.manual_seed(3)
    p = 0.25
    moe = make_moe(_rcfg(expert_dropout=p), dtype=torch.float64)
    x = torch.randn(40, 8, dtype=torch.float64)
    clean = moekit.reference.moe_forward(moe, x)[1].routing  # eval: nothing dropped
    moe.train()
    torch.manual_seed(11)
    y, info = moe(x)
    torch.manual_seed(11)
    keep_TK = torch.rand(clean.experts.shape) >= p
    assert torch.equal(info.routing.experts, torch.where(keep_TK, clean.experts, -1))
    torch.testing.assert_close(
        info.routing.weights, torch.where(keep_TK, clean.weights / (1 - p), 0)
    )
    # y is the per-token sum over the surviving slots, each weighted as above
    rows = []
    for t in range(x.shape[0]):
        y_t = torch.zeros(8, dtype=torch.float64)
        for j, e in enumerate(info.routing.experts[t].tolist()):
            if e >= 0:
                y_t = y_t + info.routing.weights[t, j] * moe.experts.expert(e, x[t : t + 1])[0]
        rows.append(y_t)
    torch.testing.assert_close(y, torch.stack(rows))
    assert 0 < (~keep_TK).float().mean() < 2 * p


def test_reference_refuses_training_with_dropout():
    moe = make_moe(_rcfg(expert_dropout=0.1)).train()
    with pytest.raises(ValueError, match="expert_dropout"):
        moekit.reference.moe_forward(moe, torch.randn(3, 8, dtype=torch.float64))


@pytest.mark.parametrize(
    "kw, field",
    [({"dropout": 1.0}, "router.dropout"), ({"expert_dropout": -0.1}, "router.expert_dropout"),
     ({"pre_norm": "batch"}, "router.pre_norm"),
     ({"schedules": {"tau": "1 -> 2 over 3"}}, "router.schedules key"),
     ({"schedules": {"temperature": "1 -> 0 over 3"}}, "router.schedules.temperature.end"),
     ({"schedules": {"temperature": "fast"}}, "router.schedules.temperature"),
     ({"schedules": {"noise_std": "1 -> 0 over 3"}}, "router.schedules.noise_std needs"),
     ({"schedules": {"capacity_factor": {"start": 2, "end": 1}}}, "capacity_factor")],
)  # fmt: skip
def test_bad_options_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        moekit.RouterConfig(**kw)


def test_schedule_values():
    lin = Schedule.parse("2.0 -> 1.0 over 10", "s")
    assert (lin.value(0), lin.value(5), lin.value(10), lin.value(99)) == (2.0, 1.5, 1.0, 1.0)
    cos = Schedule.parse("2 -> 1 over 10 cosine", "s")
    assert cos.value(5) == pytest.approx(1.5) and cos.value(2) > lin.value(2)
    held = Schedule(1.0, 0.0, 10, every=4)
    assert [held.value(s) for s in (0, 3, 4, 7, 8)] == pytest.approx([1.0, 1.0, 0.6, 0.6, 0.2])
    assert str(cos) == "2 -> 1 over 10 cosine"
    assert Schedule.parse({"start": 1, "end": 3, "steps": 2}, "s") == Schedule(1.0, 3.0, 2)


def test_schedules_survive_the_config_round_trip():
    cfg = moekit.MoEConfig(
        d_model=8,
        d_hidden=6,
        n_experts=4,
        k=2,
        router=_rcfg(noise="gaussian", schedules={"noise_std": "1 -> 0 over 100"}),
    )
    back = moekit.MoEConfig.from_dict(cfg.to_dict())
    assert back.router.schedules == {"noise_std": Schedule(1.0, 0.0, 100)}


def test_set_step_moves_the_options_and_the_layer_follows_the_reference():
    torch.manual_seed(4)
    schedules = {"temperature": "4 -> 0.5 over 8", "capacity_factor": "2 -> 0.5 over 8"}
    moe = make_moe(_rcfg(schedules=schedules), capacity_factor=2.0)
    configured = moe.cfg
    x = torch.randn(12, 8, dtype=torch.float64)
    for step in (0, 3, 8, 20):
        values = moe.router.set_step(step)
        assert values["temperature"] == pytest.approx(4 - 3.5 * min(step, 8) / 8)
        assert moe.router.live_temperature.item() == pytest.approx(values["temperature"])
        assert moe.router.capacity_factor == values["capacity_factor"]
        layer, ref = against_reference(moe, x)
        assert rel(layer.y, ref.y) < 1e-6  # the live scalar is float32
        assert torch.equal(layer.info.routing.experts, ref.info.routing.experts)
    assert moe.router.capacity(12) == math.ceil(0.5 * 12 * 2 / 4)
    # the config every block shares keeps the configured values
    assert moe.cfg is configured and moe.cfg.capacity_factor == 2.0
    assert moe.cfg.router.temperature == 1.0 and moe.cfg.capacity(12) == 12


def test_a_router_built_outside_training_starts_at_the_schedules_end():
    """What a checkpoint saved after the anneal serves with, whatever the configured value."""
    schedules = {"temperature": "4 -> 0.5 over 8", "capacity_factor": "2 -> 0.5 over 8"}
    moe = make_moe(_rcfg(temperature=3.0, schedules=schedules), capacity_factor=2.0)
    assert moe.router.live_temperature.item() == 0.5 and moe.router.capacity_factor == 0.5
    assert make_moe(_rcfg(), capacity_factor=2.0).router.capacity_factor == 2.0


def test_scheduled_noise_uses_the_live_scale():
    torch.manual_seed(5)
    moe = make_moe(
        _rcfg(noise="jitter", noise_std=0.3, schedules={"noise_std": "0.3 -> 0 over 4"}),
        dtype=torch.float32,
    ).train()
    x = torch.randn(20, 8)
    moe.router.set_step(4)  # anneal over: no noise left
    assert torch.equal(moe.router(x).logits, F.linear(x, moe.router.weight))
    moe.router.set_step(0)
    assert not torch.equal(moe.router(x).logits, F.linear(x, moe.router.weight))


def test_scheduled_temperature_and_noise_move_without_recompiling():
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm

    schedules = {"temperature": "2 -> 1 over 4", "noise_std": "0.5 -> 0 over 4"}
    moe = make_moe(_rcfg(noise="gaussian", schedules=schedules), dtype=torch.float32).train()
    router = torch.compile(moe.router, backend=backend)
    x = torch.randn(6, 8)
    for step in range(5):
        moe.router.set_step(step)
        torch.manual_seed(step)
        got = router(x)
        torch.manual_seed(step)
        assert torch.equal(got.logits, moe.router(x).logits)
    assert len(compiles) == 1
