import torch
from rich.console import Console

from moekit.demos.layer_demo import LayerDemo, make_regimes, purity, run_demo


def test_regimes_share_clusters_between_splits():
    a, b = make_regimes(512, seed=0), make_regimes(512, seed=1)
    for r in range(4):
        assert torch.allclose(a.x[a.regime == r].mean(0), b.x[b.regime == r].mean(0), atol=0.35)


def test_purity_of_a_perfect_and_a_uniform_routing():
    assert purity(torch.eye(4) * 10) == 1.0
    assert purity(torch.ones(4, 4)) == 0.25


def test_short_demo_learns_and_specialises(tmp_path):
    result = run_demo(LayerDemo(out=str(tmp_path), steps=150), console=Console(quiet=True))
    assert result["val_mse"] < 0.5 * result["target_variance"]
    assert result["routing_purity"] > 0.4
    assert (tmp_path / "regime_expert_heatmap.png").stat().st_size > 1000
