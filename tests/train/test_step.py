"""`TrainStep`: the one training step behind the trainer, System, demos and finance."""

import copy

import pytest
import torch
from torch import nn

import moekit
from moekit.train.step import Precision, StepConfig, StepLoss, TrainStep, resolve_precision


def _data(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randn(n, 1, generator=g)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))


def _forward(model):
    return lambda batch: model(batch[0])


def _loss(out, batch):
    return StepLoss(nn.functional.mse_loss(out, batch[1]), out.square().mean())


def test_step_equals_a_hand_written_step():
    x, y = _data()
    model, ref = _model(), _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    step = TrainStep(model, StepConfig(max_grad_norm=0.1, aux_weight=0.5))
    for _ in range(3):
        record = step(opt, [(x, y)], _forward(model), _loss)
        out = ref(x)
        loss = nn.functional.mse_loss(out, y) + 0.5 * out.square().mean()
        ref_opt.zero_grad()
        loss.backward()
        norm = nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        ref_opt.step()
        assert torch.equal(record["loss"], loss.detach())
        assert torch.equal(record["grad_norm"], norm)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_micro_batches_average_to_the_whole_batch():
    x, y = _data(n=8)
    whole, parts = _model(), _model()
    record = {}
    for model, batches in ((whole, [(x, y)]), (parts, [(x[:4], y[:4]), (x[4:], y[4:])])):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        record[len(batches)] = TrainStep(model)(opt, batches, _forward(model), _loss)
    for a, b in zip(whole.parameters(), parts.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert "grad_norm" not in record[1]  # clipping off: no norm computed
    first = nn.functional.mse_loss(_model()(x[:4]), y[:4])
    second = nn.functional.mse_loss(_model()(x[4:]), y[4:])
    torch.testing.assert_close(record[2]["task_loss"], (first + second).detach() / 2)


def test_penalty_is_added_and_gradients_are_cleared_first():
    x, y = _data()
    model = _model()
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e6)  # left over from outside the step
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def loss(out, batch):
        return StepLoss(out.mean() * 0, out.mean() * 0, penalty=out.sum())

    record = TrainStep(model)(opt, [(x, y)], _forward(model), loss)
    assert torch.equal(record["loss"], model(x).sum().detach())
    ref = copy.deepcopy(model)
    ref.zero_grad()
    ref(x).sum().backward()
    for p, r in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, r.grad)


def test_metrics_are_averaged_nested_and_stay_on_device():
    x, y = _data()
    model = _model()

    def loss(out, batch):
        return StepLoss(out.mean(), out.mean() * 0, metrics={"m": {"a": batch[0].sum()}})

    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    rec = TrainStep(model)(
        torch.optim.SGD(model.parameters(), lr=0.1), batches, _forward(model), loss
    )
    assert isinstance(rec["m"]["a"], torch.Tensor)
    torch.testing.assert_close(rec["m"]["a"], (x[:4].sum() + x[4:].sum()) / 2)


@pytest.mark.parametrize("precision", ["fp16", "float16"])
def test_fp16_scales_the_loss_and_autocasts(precision):
    model = _model()
    step = TrainStep(model, StepConfig(precision=precision))
    assert step.scaler.is_enabled() and step.cfg.precision is Precision.FP16
    seen = []

    def forward(batch):
        out = model(batch[0])
        seen.append(out.dtype)
        return out

    def loss(out, batch):
        return StepLoss(nn.functional.mse_loss(out.float(), batch[1]), out.float().mean() * 0)

    step(torch.optim.SGD(model.parameters(), lr=0.1), [_data()], forward, loss)
    assert seen == [torch.float16]
    assert not TrainStep(_model(), StepConfig(precision="bf16")).scaler.is_enabled()


def test_precision_vocabulary():
    assert Precision.parse("bfloat16") is Precision.BF16 is Precision.parse("bf16")
    assert Precision.parse(None) is Precision.FP32 and Precision.FP32.dtype is None
    assert Precision.parse("float16").dtype is torch.float16
    with pytest.raises(ValueError, match=r"amp='int8' is not one of fp32, bf16, fp16, float32"):
        Precision.parse("int8", "amp")
    assert resolve_precision("auto", torch.device("cpu")) is Precision.FP32
    assert resolve_precision("auto", torch.device("cuda")) is Precision.BF16
    assert resolve_precision("float32", torch.device("cuda")) is Precision.FP32


@pytest.mark.parametrize(
    "kw, field",
    [({"precision": "fp8"}, "precision"), ({"max_grad_norm": 0.0}, "max_grad_norm"),
     ({"aux_weight": -1.0}, "aux_weight")],
)  # fmt: skip
def test_bad_step_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        StepConfig(**kw)


def test_a_step_without_micro_batches_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="micro_batches"):
        TrainStep(model)(torch.optim.SGD(model.parameters(), lr=0.1), [], _forward(model), _loss)


def _sigmoid_moe():
    torch.manual_seed(0)
    rcfg = moekit.RouterConfig(kind="sigmoid", options={"bias_update_rate": 0.01})
    return moekit.MoE(moekit.MoEConfig(d_model=8, d_hidden=6, n_experts=4, k=2, router=rcfg))


def _moe_loss(out, batch):
    y, info = out
    return StepLoss(y.square().mean(), info.aux_loss)


def test_sigmoid_bias_moves_once_per_step_whatever_the_accumulation():
    """4 micro-batches give the bias of one batch of 4x the size (DeepSeek-V3's update runs
    once per optimiser step, on the step's whole load)."""
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(64, 8, generator=g) + torch.arange(8.0) / 4 for _ in range(3)]
    whole, parts = _sigmoid_moe(), _sigmoid_moe()
    for model, split in ((whole, 1), (parts, 4)):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # only the bias moves
        step = TrainStep(model)
        for x in batches:
            step(opt, list(x.chunk(split)), lambda b, model=model: model(b), _moe_loss)
            assert model.router.load_E.sum() == 0  # counted, applied, reset
    bias = whole.router.expert_bias
    assert bias.abs().sum() > 0 and torch.equal(parts.router.expert_bias, bias)
    assert bias.abs().max() <= 3 * 0.01 + 1e-6  # at most one move of the rate per step
