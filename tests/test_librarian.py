"""Librarian deduplication: merges exactly the near-duplicate expert outputs, at inference."""

import pytest
import torch
import torch.nn.functional as F

import moekit
from moekit.librarian import merge_duplicates


def make_moe(threshold, capacity_factor=None, n_experts=4, k=2, **extra):
    cfg = moekit.MoEConfig(
        d_model=8,
        d_hidden=6,
        n_experts=n_experts,
        k=k,
        capacity_factor=capacity_factor,
        expert=moekit.ExpertConfig(bias=True),
        backend="torch",
        dedup_threshold=threshold,
        **extra,
    )
    moe = moekit.MoE(cfg).double().eval()
    with torch.no_grad():
        moe.router.weight.normal_()
        for p in moe.experts.parameters():
            p.normal_(std=0.5)
    return moe


def copy_expert(moe, src, dst, noise=0.0):
    with torch.no_grad():
        for p in moe.experts.parameters():
            p[dst] = p[src] + noise * torch.randn_like(p[src])


def plain_twin(moe):
    """The same layer without deduplication."""
    cfg = moekit.MoEConfig.from_dict({**moe.cfg.to_dict(), "dedup_threshold": None})
    twin = moekit.MoE(cfg).double().eval()
    twin.load_state_dict(moe.state_dict())
    return twin


def naive(moe, x, threshold):
    """Per token: visit kept slots by weight, merge into the first close survivor."""
    _, info = plain_twin(moe)(x)
    ys, weights = [], []
    for t in range(x.shape[0]):
        slots = [
            (w, j, e)
            for j, (e, w) in enumerate(
                zip(info.routing.experts[t].tolist(), info.routing.weights[t].tolist(), strict=True)
            )
            if e >= 0
        ]
        survivors = []  # [slot, expert, output, merged weight]
        for w, j, e in sorted(slots, key=lambda s: (-s[0], s[1])):
            out = moe.experts.expert(e, x[t : t + 1])[0]
            for s in survivors:
                if F.cosine_similarity(out, s[2], dim=0) >= threshold:
                    s[3] += w
                    break
            else:
                survivors.append([j, e, out, w])
        row = [0.0] * info.routing.weights.shape[1]
        y = x.new_zeros(x.shape[1])
        for j, _, out, w in survivors:
            row[j] = w
            y = y + w * out
        ys.append(y)
        weights.append(row)
    return torch.stack(ys), torch.tensor(weights, dtype=x.dtype)


def test_merge_rule_on_hand_built_outputs():
    a, b, c = torch.eye(3, dtype=torch.float64)
    outputs = torch.stack([b, a, 2 * a, 0.9 * a + 0.6 * c])[None]  # [1, 4, 3]
    weights = torch.tensor([[0.1, 0.2, 0.4, 0.3]], dtype=torch.float64)
    kept = torch.ones(1, 4, dtype=torch.bool)
    merged, absorbed = merge_duplicates(outputs, weights, kept, threshold=0.99)
    # slot 2 (heaviest) absorbs its exact-direction duplicate slot 1; slot 3 (cos 0.83) stays
    assert torch.allclose(merged, torch.tensor([[0.1, 0.0, 0.6, 0.3]], dtype=torch.float64))
    assert absorbed.tolist() == [[False, True, False, False]]
    merged, absorbed = merge_duplicates(outputs, weights, kept, threshold=0.8)
    assert torch.allclose(merged, torch.tensor([[0.1, 0.0, 0.9, 0.0]], dtype=torch.float64))
    # a slot not kept takes part in nothing
    kept[0, 1] = False
    merged, absorbed = merge_duplicates(outputs, weights, kept, threshold=0.99)
    assert merged[0, 1] == 0 and not absorbed.any()


def test_only_survivors_absorb():
    """c is close to b but not to a; b merged into a, so c survives (no chains)."""
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.96, 0.28], dtype=torch.float64)  # cos(a, b) = 0.96
    c = torch.tensor([0.8, 0.6], dtype=torch.float64)  # cos(b, c) = 0.936, cos(a, c) = 0.8
    weights = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    merged, _ = merge_duplicates(
        torch.stack([a, b, c])[None], weights, torch.ones(1, 3, dtype=torch.bool), 0.9
    )
    assert torch.allclose(merged, torch.tensor([[0.8, 0.0, 0.2]], dtype=torch.float64))


def test_identical_experts_merge_and_distinct_ones_never():
    torch.manual_seed(0)
    moe = make_moe(0.999)
    copy_expert(moe, 0, 1)  # experts 0 and 1 compute the same function
    x = torch.randn(64, 8, dtype=torch.float64)
    y, info = moe(x)
    y_plain, info_plain = plain_twin(moe)(x)
    pair = info_plain.routing.experts.sort(-1).values
    both = (pair[:, 0] == 0) & (pair[:, 1] == 1)
    assert 0 < int(both.sum()) < 64  # some tokens picked the twins, some did not
    assert torch.equal(info.metrics["dedup_fraction"], both.double().mean().float() / 2)
    w, w_plain = info.routing.weights, info_plain.routing.weights
    assert torch.allclose(w[both].max(-1).values, torch.ones(int(both.sum()), dtype=w.dtype))
    assert torch.equal((w[both] == 0).sum(-1), torch.ones(int(both.sum()), dtype=torch.long))
    assert torch.equal(w[~both], w_plain[~both])
    # exact duplicates: merging leaves the output as it was
    assert torch.allclose(y, y_plain, rtol=1e-12, atol=1e-12)


def test_distinct_experts_never_merge():
    torch.manual_seed(1)
    moe = make_moe(0.9, n_experts=6, k=3)
    x = torch.randn(50, 8, dtype=torch.float64)
    y, info = moe(x)
    y_plain, info_plain = plain_twin(moe)(x)
    assert info.metrics["dedup_fraction"] == 0
    assert torch.equal(info.routing.weights, info_plain.routing.weights)
    assert torch.allclose(y, y_plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("capacity_factor", [None, 0.6])
def test_near_duplicates_match_the_per_token_rule(capacity_factor):
    torch.manual_seed(2)
    moe = make_moe(0.99, capacity_factor, n_experts=6, k=3, n_shared_experts=1)
    copy_expert(moe, 0, 1, noise=0.01)
    copy_expert(moe, 2, 3, noise=0.01)
    copy_expert(moe, 2, 4, noise=0.3)  # too far from 2 to merge at 0.99
    x = torch.randn(40, 8, dtype=torch.float64)
    y, info = moe(x)
    y_naive, w_naive = naive(moe, x, 0.99)
    y_plain, _ = plain_twin(moe)(x)
    shared = moe.shared(x)
    assert info.metrics["dedup_fraction"] > 0
    assert torch.allclose(info.routing.weights, w_naive, atol=1e-12)
    assert torch.allclose(y, y_naive + shared, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(y, y_plain, rtol=1e-6, atol=1e-8)  # merging changed y
    if capacity_factor is not None:
        assert info.metrics["dropped_fraction"] > 0


def test_training_ignores_the_option():
    torch.manual_seed(3)
    moe = make_moe(0.5)
    copy_expert(moe, 0, 1, noise=0.05)
    x = torch.randn(30, 8, dtype=torch.float64)
    moe.train()
    y, info = moe(x)
    assert "dedup_fraction" not in info.metrics
    assert torch.allclose(y, plain_twin(moe).train()(x)[0], rtol=1e-12, atol=1e-12)
    moe.eval()
    assert moe(x)[1].metrics["dedup_fraction"] > 0


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_threshold_range(bad):
    with pytest.raises(ValueError, match="dedup_threshold"):
        moekit.MoEConfig(dedup_threshold=bad)
    assert moekit.MoEConfig(dedup_threshold=1.0).dedup_threshold == 1.0


def test_expert_choice_empty_slots_and_empty_input():
    torch.manual_seed(4)
    moe = make_moe(0.99, router=moekit.RouterConfig(kind="expert_choice"))
    copy_expert(moe, 0, 1, noise=0.01)
    x = torch.randn(12, 8, dtype=torch.float64)
    y, info = moe(x)
    y_naive, w_naive = naive(moe, x, 0.99)
    assert info.routing.weights.shape == (12, 4) and info.metrics["dedup_fraction"] > 0
    assert torch.allclose(info.routing.weights, w_naive, atol=1e-12)
    assert torch.allclose(y, y_naive, rtol=1e-10, atol=1e-12)
    y, info = moe(x[:0])
    assert y.shape == (0, 8) and info.metrics["dedup_fraction"] == 0


def test_benchmark_writes_its_report(tmp_path):
    from moekit.bench.librarian import main

    main(["--tokens", "64", "--out-dir", str(tmp_path)])
    (report,) = tmp_path.glob("librarian-*.md")
    rows = {
        tuple(cells[:2]): cells[2:]
        for line in report.read_text().splitlines()
        if line.startswith("| ") and (cells := [c.strip() for c in line.strip("|").split("|")])
    }
    merged, error = rows[("pairs, noise 0", "0.99")]
    assert merged != "0.00%" and float(error) < 1e-6  # exact copies merge without error
    assert rows[("pairs, noise 0.5", "0.99")][0] == "0.00%"
