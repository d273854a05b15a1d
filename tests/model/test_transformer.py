import pytest
import torch

import moekit
from moekit.model import ModelConfig, Transformer


def test_shapes_losses_and_layer_metrics(tiny_cfg):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg())
    x = torch.randint(0, 37, (2, 10))
    out = model(x, targets=x)
    assert out.out.shape == (2, 10, 37)
    assert [info is not None for info in out.layers] == [False, True, False]
    moe_info = out.layers[1]
    assert moe_info.metrics["expert_load"].shape == (4,)
    assert torch.allclose(out.aux_loss, moe_info.aux_loss)
    assert torch.allclose(out.loss, out.task_loss + out.aux_loss)
    # the initial LM loss is close to uniform over the vocabulary
    assert abs(out.task_loss.item() - torch.log(torch.tensor(37.0)).item()) < 0.2


def test_aux_loss_weight_scales_sum_over_layers(tiny_cfg):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(moe_every=1, aux_loss_weight=3.0))
    x = torch.randint(0, 37, (2, 8))
    out = model(x, targets=x)
    total = sum(i.aux_loss for i in out.layers)
    assert torch.allclose(out.aux_loss, total)
    assert torch.allclose(out.loss, out.task_loss + 3.0 * total)


def test_continuous_regression_head(tiny_cfg):
    model = Transformer(tiny_cfg(vocab_size=None, d_in=3, d_out=3, norm="layer"))
    x = torch.randn(2, 5, 3)
    out = model(x, targets=x)
    assert out.out.shape == (2, 5, 3)
    assert torch.allclose(out.task_loss, torch.nn.functional.mse_loss(out.out, x))


def test_causal_future_does_not_change_past(tiny_cfg):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg()).eval()
    x = torch.randint(0, 37, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 37
    a, b = model(x).out, model(y).out
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_tied_embeddings_share_storage_and_active_params(tiny_cfg):
    model = Transformer(tiny_cfg(tie_embeddings=True, moe_every=1))
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()
    p = model.num_params()
    per_layer = sum(x.numel() for x in model.blocks[0].ffn.experts.parameters())
    assert p["total"] - p["active"] == 3 * (per_layer - per_layer * 2 // 4)


def test_dense_equivalent_matches_active_ffn_width(tiny_cfg):
    cfg = tiny_cfg(moe_every=1)
    dense = cfg.dense_equivalent()
    assert dense.moe_every == 0 and dense.d_ff == (2 + 1) * 24
    moe_p, dense_p = Transformer(cfg).num_params(), Transformer(dense).num_params()
    router = 3 * 4 * 32
    assert moe_p["active"] - router == dense_p["active"]


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(n_kv_heads=3), "n_kv_heads"),
        (dict(d_model=30), "d_model"),
        (dict(norm="batch"), "norm"),
        (dict(vocab_size=10, d_in=3), "vocab_size"),
        (dict(vocab_size=None, d_in=3, d_out=None), "d_out"),
        (dict(dropout=1.5), "dropout"),
        (dict(moe_every=-1), "moe_every"),
    ],
)
def test_bad_config_names_the_field(kw, key):
    base = dict(vocab_size=10, d_model=32, n_heads=4)
    base.update(kw)
    with pytest.raises(ValueError, match=key):
        ModelConfig(**base)


def test_moe_width_follows_model_width():
    cfg = ModelConfig(vocab_size=10, d_model=64, moe=moekit.MoEConfig(d_model=8, d_hidden=16))
    assert cfg.moe.d_model == 64
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_positions_per_row_or_shared(tiny_cfg):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg()).eval()
    x = torch.randint(0, 37, (2, 6))
    base = model(x).out
    assert torch.equal(model(x, positions=torch.arange(6)).out, base)
    per_row = torch.arange(6).repeat(2, 1)
    torch.testing.assert_close(model(x, positions=per_row).out, base)
    shifted = model(x, positions=per_row + torch.tensor([[7], [0]])).out
    torch.testing.assert_close(shifted, base)  # RoPE scores depend on offsets only
    gapped = model(x, positions=per_row + torch.tensor([[0] * 6, [0, 0, 0, 9, 9, 9]])).out
    torch.testing.assert_close(gapped[0], base[0])
    torch.testing.assert_close(gapped[1, :3], base[1, :3])
    assert not torch.allclose(gapped[1, 3:], base[1, 3:])  # row 1 alone sees a gap
    with pytest.raises(ValueError, match="positions"):
        model(x, positions=torch.arange(5))
