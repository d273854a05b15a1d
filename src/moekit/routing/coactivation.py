"""Expert co-activation: which experts tokens choose together, and clusters of them.

Counts are a [E, E] matrix (tokens that chose both i and j; diagonal: tokens that chose i).
Its clusters ("constellations") can limit routing via `RouterConfig.constellations`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def coactivation_counts(experts_TK: Tensor, n_experts: int) -> Tensor:
    """[E, E] float32 counts of this batch's chosen experts; empty slots (-1) count for nothing."""
    chose_TE = torch.zeros(experts_TK.shape[0], n_experts, device=experts_TK.device)
    # add, not write: empty slots (-1) land on expert 0 with 0 and must not overwrite it
    chose_TE.scatter_add_(1, experts_TK.clamp_min(0), (experts_TK >= 0).float())
    return chose_TE.T @ chose_TE


def find_constellations(coactivation_EE: Tensor, n: int) -> list[list[int]]:
    """Partition the experts into n clusters of experts often chosen together.

    Clusters are ordered by their smallest expert id; each lists its experts in order.
    """
    E = coactivation_EE.shape[0]
    if not isinstance(n, int) or not 1 <= n <= E:
        raise ValueError(f"n={n!r} must be an integer in [1, n_experts={E}]")
    return _sync_cluster_coactivation(coactivation_EE, n)


def _sync_cluster_coactivation(coactivation_EE: Tensor, n: int) -> list[list[int]]:
    """Average-linkage hierarchical clustering on 1 - normalised co-activation. NOTE: host sync.

    Normalised co-activation C_ij / sqrt(C_ii C_jj) is the cosine between the experts' token
    sets (Ochiai coefficient), 1 for experts always chosen together; average linkage (UPGMA)
    merges groups by mean distance, so one stray co-activation does not join two clusters.
    """
    from scipy.cluster.hierarchy import cut_tree, linkage
    from scipy.spatial.distance import squareform

    counts = coactivation_EE.detach().double().cpu()
    E = counts.shape[0]
    if n == E or E == 1:
        return [[e] for e in range(E)]
    diag = counts.diagonal().clamp_min(1.0)
    similarity = counts / torch.sqrt(diag[:, None] * diag[None, :])
    distance = (1.0 - similarity).clamp_min(0.0).fill_diagonal_(0.0)
    distance = (distance + distance.T) / 2
    tree = linkage(squareform(distance.numpy(), checks=False), method="average")
    labels = cut_tree(tree, n_clusters=n)[:, 0]  # exactly n clusters, even with tied distances
    groups: dict[int, list[int]] = {}
    for e, label in enumerate(labels.tolist()):
        groups.setdefault(label, []).append(e)
    return sorted(groups.values())
