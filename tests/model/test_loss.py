"""The chunked LM loss equals the whole one, loss and every gradient, and `out` still reads."""

import pytest
import torch
import torch.nn.functional as F
from tests.tiny import tiny_model

from moekit.model import ModelConfig
from moekit.model.loss import chunked_cross_entropy


def _loss_and_grads(model, x, targets):
    model.zero_grad()
    out = model(x, targets=targets)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_and_gradients_equal_the_whole_loss(chunk, tied):
    whole = tiny_model(tie_embeddings=tied).double()
    chunked = tiny_model(tie_embeddings=tied, loss_chunk_tokens=chunk).double()
    chunked.load_state_dict(whole.state_dict())
    x = torch.randint(0, whole.cfg.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))
    want, want_grads = _loss_and_grads(whole, x, x)
    got, got_grads = _loss_and_grads(chunked, x, x)
    torch.testing.assert_close(got.task_loss, want.task_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-7)
    assert sorted(got_grads) == sorted(want_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-6, atol=1e-9, msg=name)
    assert got.logits is None  # not computed by the loss
    torch.testing.assert_close(got.out, want.out)


def test_ignored_targets_are_left_out_of_the_mean():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(10, 6, generator=g), torch.randn(11, 6, generator=g)
    targets = torch.randint(0, 11, (10,), generator=g)
    targets[[2, 5, 9]] = -100
    want = F.cross_entropy(h @ w.T, targets)
    torch.testing.assert_close(chunked_cross_entropy(h, w, None, targets, 4), want)


def test_loss_chunk_tokens_must_be_a_non_negative_integer():
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        ModelConfig(vocab_size=8, loss_chunk_tokens=-1)
