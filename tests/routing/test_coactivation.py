"""Co-activation counts and their clusters, without a layer."""

import pytest
import torch

from moekit.routing.coactivation import coactivation_counts, find_constellations


def test_counts_pairs_of_chosen_experts_and_skip_empty_slots():
    experts_TK = torch.tensor([[0, 2], [2, -1], [-1, -1]])
    expected = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 2.0]])
    assert torch.equal(coactivation_counts(experts_TK, 3), expected)


def test_clusters_follow_blocks_of_the_matrix():
    # experts {0, 3} always chosen together, {1, 2} together, one stray 0-1 co-activation
    counts = torch.tensor(
        [[10.0, 1.0, 0.0, 10.0], [1.0, 8.0, 8.0, 0.0], [0.0, 8.0, 8.0, 0.0], [10.0, 0.0, 0.0, 10.0]]
    )
    assert find_constellations(counts, 2) == [[0, 3], [1, 2]]
    assert find_constellations(counts, 4) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="n=0"):
        find_constellations(counts, 0)
