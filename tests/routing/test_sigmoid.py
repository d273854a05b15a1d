import torch

import moekit


def test_aux_loss_free_bias_balances_a_skewed_stream():
    """DeepSeek-V3 bias: with every aux weight at 0, load max/mean < 1.2 within 200 steps."""
    torch.manual_seed(0)
    E, D = 8, 16
    rcfg = moekit.RouterConfig(
        kind="sigmoid",
        options={"bias_update_rate": 0.01},
        load_balance_weight=0.0,
        z_loss_weight=0.0,
    )
    moe = moekit.MoE(moekit.MoEConfig(d_model=D, d_hidden=8, n_experts=E, k=2, router=rcfg)).train()
    with torch.no_grad():
        moe.router.weight.normal_(std=0.3)
    skew = torch.zeros(D)
    skew[:4] = 2.0  # a constant offset makes a few experts win most tokens
    first = None
    for _ in range(200):
        _, info = moe(torch.randn(512, D) + skew)
        moe.router.before_optimizer_step()  # the training step's hook
        if first is None:
            first = info.metrics["load_max_over_mean"].item()
    assert first > 1.5  # the stream really is skewed at the start
    assert info.metrics["load_max_over_mean"].item() < 1.2
    assert info.aux_loss.item() == 0.0
    assert "router.expert_bias" in moe.state_dict()  # saved with the model


def test_the_bias_moves_once_per_optimizer_step_not_per_forward():
    torch.manual_seed(3)
    rcfg = moekit.RouterConfig(kind="sigmoid", options={"bias_update_rate": 0.1})
    moe = moekit.MoE(moekit.MoEConfig(d_model=4, d_hidden=4, n_experts=4, k=1, router=rcfg)).train()
    x = torch.randn(64, 4) + 3
    moe(x)
    moe(x)
    assert torch.equal(moe.router.expert_bias, torch.zeros(4))  # forwards only count
    assert moe.router.load_E.sum() == 2 * 64
    moe.router.before_optimizer_step()
    assert moe.router.expert_bias.abs().max() == 0.1 and moe.router.load_E.sum() == 0
    assert "router.load_E" not in moe.state_dict()  # a running count, not part of the model
    moved = moe.router.expert_bias.clone()
    moe.router.before_optimizer_step()  # a step without training forwards: no change
    assert torch.equal(moe.router.expert_bias, moved)


def test_bias_changes_selection_not_weights():
    torch.manual_seed(1)
    moe = moekit.MoE(
        moekit.MoEConfig(
            d_model=4,
            d_hidden=4,
            n_experts=4,
            k=1,
            router=moekit.RouterConfig(kind="sigmoid", renormalize=False),
        )
    ).eval()
    x = torch.randn(32, 4)
    with torch.no_grad():
        moe.router.expert_bias[:] = torch.tensor([0.0, 0.0, 0.0, 100.0])
    info = moe.router(x)
    assert bool((info.experts == 3).all())
    assert torch.allclose(info.weights[:, 0], torch.sigmoid(x @ moe.router.weight.T)[:, 3])


def test_eval_does_not_move_the_bias():
    moe = moekit.MoE(
        moekit.MoEConfig(
            d_model=4, d_hidden=4, n_experts=4, k=1, router=moekit.RouterConfig(kind="sigmoid")
        )
    ).eval()
    moe(torch.randn(64, 4) + 3)
    assert torch.equal(moe.router.expert_bias, torch.zeros(4))


def test_scaling_factor_multiplies_weights():
    torch.manual_seed(2)
    a = moekit.MoE(
        moekit.MoEConfig(
            d_model=4,
            d_hidden=4,
            n_experts=4,
            k=2,
            router=moekit.RouterConfig(kind="sigmoid", scaling_factor=2.5),
        )
    ).eval()
    w = a.router(torch.randn(6, 4)).weights
    assert torch.allclose(w.sum(-1), torch.full((6,), 2.5))
