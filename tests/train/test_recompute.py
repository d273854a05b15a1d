"""Activation checkpointing: the same gradients, bit for bit on CPU, for less kept memory."""

import pytest
import torch
from tests.tiny import TINY_MOE

from moekit import MoEConfig, RouterConfig
from moekit.train.recompute import checkpoint_activations
from moekit.train.step import optimizer_step_hooks

ROUTERS = {
    # RNG in the forward (noise, both dropouts): the recompute must draw the same numbers
    "noisy topk": RouterConfig(noise="gaussian", noise_std=0.5, dropout=0.1, expert_dropout=0.2),
    # a buffer the forward updates (the load behind the bias): the recompute must count nothing
    "sigmoid bias": RouterConfig(kind="sigmoid", options={"bias_update_rate": 0.05}),
}


def _run(tiny_model, mode, router, steps=4):
    moe = MoEConfig(**TINY_MOE, router=router, track_coactivation=True)
    model = tiny_model(seed=0, n_layers=4, moe=moe).train()
    wrapped = checkpoint_activations(model, mode)
    torch.manual_seed(1)
    x = torch.randint(0, 37, (3, 16))
    for step in range(steps):  # buffers move between steps, gradients accumulate
        out = model(x, x)
        out.loss.backward()
        if step < steps - 1:  # the last step's load counts stay readable
            for hook in optimizer_step_hooks(model):
                hook()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return wrapped, grads, {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("mode", ["experts", "blocks"])
def test_gradients_and_buffers_equal_no_checkpointing_bit_for_bit(tiny_model, mode, router):
    _, want_grads, want_buffers = _run(tiny_model, "none", ROUTERS[router])
    wrapped, grads, buffers = _run(tiny_model, mode, ROUTERS[router])
    assert wrapped == (4 if mode == "blocks" else 2)  # blocks, or the MoE layers (2 and 4)
    assert grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        assert torch.equal(grads[name], grad), name
    for name, buffer in want_buffers.items():
        assert torch.equal(buffers[name], buffer), name
    if router == "sigmoid bias":  # the bias moved, the load was counted once per forward
        assert want_buffers["blocks.1.ffn.router.expert_bias"].abs().sum() > 0
        assert buffers["blocks.1.ffn.router.load_E"].sum() == 3 * 16 * TINY_MOE["k"]


def test_checkpointed_blocks_keep_fewer_tensors_for_backward(tiny_model):
    def saved(mode):
        model = tiny_model(seed=0, n_layers=4)
        checkpoint_activations(model, mode)
        count = [0]

        def pack(t):
            count[0] += 1
            return t

        x = torch.randint(0, 37, (2, 16))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, x).loss.backward()
        return count[0]

    none, experts, blocks = saved("none"), saved("experts"), saved("blocks")
    assert blocks < experts < none


def test_state_dict_names_do_not_change(tiny_model):
    plain, wrapped = tiny_model(seed=0), tiny_model(seed=0)
    checkpoint_activations(wrapped, "blocks")
    assert list(plain.state_dict()) == list(wrapped.state_dict())


def test_unknown_mode_is_refused(tiny_model):
    with pytest.raises(ValueError, match="train.activation_checkpointing"):
        checkpoint_activations(tiny_model(), "layers")
