import torch

from moekit.routing.losses import router_losses
from moekit.types import Routing


def _routing(experts, logits):
    return Routing(
        experts, torch.ones(experts.shape), torch.ones(experts.shape), logits, logits.softmax(-1)
    )


def test_switch_balance_by_hand():
    # 2 tokens, 2 experts, k=1: both pick expert 0; mean probs (0.75, 0.25) -> 2 * (1 * 0.75)
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    r = Routing(
        torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), torch.ones(2, 1), probs, probs
    )
    assert torch.isclose(router_losses(r)["load_balance"], torch.tensor(1.5))


def test_sequence_balance_is_the_mean_of_per_sequence_balance():
    torch.manual_seed(0)
    B, S, E, k = 3, 7, 5, 2
    logits = torch.randn(B * S, E)
    experts = logits.topk(k, -1).indices
    experts[0, 1] = -1  # an empty slot counts for nothing
    batched = router_losses(_routing(experts, logits), (B, S))["seq_balance"]
    per_seq = [
        router_losses(_routing(experts[b * S : (b + 1) * S], logits[b * S : (b + 1) * S]))[
            "load_balance"
        ]
        for b in range(B)
    ]
    assert torch.isclose(batched, torch.stack(per_seq).mean())
    assert not torch.isclose(batched, router_losses(_routing(experts, logits))["load_balance"])
