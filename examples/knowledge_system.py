"""A tour of the knowledge system in one script (under a minute on a CPU).

1. Supervisor gating: an attention router scores experts with multi-head attention.
2. `moekit.System` trains it on a task with two regimes and records insights (pooled hidden
   states and the experts that handled them) into a SQLite `KnowledgeStore`.
3. The store answers queries: the insights nearest to a new sequence, and their neighbours
   (insights that share experts).
4. Constellations: experts the router chose together, clustered into groups, then used to
   restrict routing to the best group per token.
5. The librarian merges near-duplicate expert outputs at inference and reports how often.

    python examples/knowledge_system.py [--steps 100] [--out moekit-out/knowledge]

What the switches (compile, AMP, checkpointing) cost and buy is measured by
`moekit bench system` (add `--device cuda` on a GPU).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

import moekit
from moekit.routing.attention import AttentionOptions

D_IN, D = 4, 32


def batch(gen: torch.Generator, n: int = 16, length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences [n, length, D_IN] from two regimes: smooth waves, or noisy steps.

    The target is the next position, so the two regimes call for different experts.
    """
    t = torch.arange(length + 1, dtype=torch.float32)
    freq = torch.rand(n, 1, D_IN, generator=gen) * 0.5 + 0.1
    waves = torch.sin(freq * t[None, :, None])  # [n, L+1, D_IN]
    steps = torch.sign(torch.randn(n, length + 1, D_IN, generator=gen)).cumsum(1) / 5
    regime = (torch.rand(n, 1, 1, generator=gen) < 0.5).float()
    seq = regime * waves + (1 - regime) * steps
    return seq[:, :-1], seq[:, 1:]


def moe_config(groups: list[list[int]] | None = None, **extra) -> moekit.MoEConfig:
    """8 experts, top-2, chosen by the attention router (within one of `groups` when given)."""
    router = moekit.RouterConfig(
        kind="attention",
        options=AttentionOptions(heads=4, dim=8),
        constellations=groups,
        topk_groups=1,
    )
    return moekit.MoEConfig(d_model=D, d_hidden=64, n_experts=8, k=2, router=router, **extra)


def train(system: moekit.System, steps: int, seed: int = 0) -> float:
    """Trains `system` for `steps` steps; returns the last loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(system.parameters(), lr=3e-3)
    loss = torch.zeros(())
    for _ in range(steps):
        loss = system.training_step(batch(gen), opt, nn.MSELoss())["loss"]
    return float(loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps")
    parser.add_argument("--out", default="moekit-out/knowledge", help="where the store goes")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    db = out / "knowledge.sqlite"
    db.unlink(missing_ok=True)

    print("1-2. supervisor (attention) router, trained by moekit.System with a knowledge store")
    cfg = moekit.SystemConfig(
        moe=moe_config(track_coactivation=True),
        d_in=D_IN, d_out=D_IN, n_layers=2,
        knowledge_path=str(db), knowledge_every=5,
    )  # fmt: skip
    system = moekit.System(cfg)
    loss = train(system, args.steps)
    print(f"   loss after {args.steps} steps: {loss:.4f}; insights stored: {len(system.store)}")

    print("3. the insights nearest to a new sequence, and what shares their experts")
    x, _ = batch(torch.Generator().manual_seed(99), n=1)
    with torch.no_grad():
        hidden = system(x).hiddens[-1].mean(dim=(0, 1))  # [D]: the recorded layer's input, pooled
    for hit in system.query_knowledge_graph(hidden, top_k=3):
        near = system.store.neighbors(hit.node_id, limit=3)
        print(
            f"   node {hit.node_id}: cosine {hit.similarity:.3f}, experts {hit.experts}, "
            f"step {hit.step}; shares experts with {[n for n, _ in near]}"
        )

    print("4. constellations: experts chosen together, then routing limited to one group")
    layer = system.model.layers[-1]
    groups = layer.constellations(3)
    print(f"   groups of layer {len(system.model.layers) - 1}: {groups}")
    grouped = moe_config(groups)
    routed = moekit.MoE(grouped)
    routed.load_state_dict(layer.state_dict(), strict=False)
    with torch.no_grad():
        _, info = routed(torch.randn(64, D))
    member = {e: g for g, group in enumerate(groups) for e in group}
    spread = [len({member[int(e)] for e in row if e >= 0}) for row in info.routing.experts]
    print(f"   tokens whose experts come from one group: {spread.count(1)} of {len(spread)}")

    print("5. the librarian: near-duplicate expert outputs merged at inference")
    for threshold in (0.99, 0.5):
        lib = moekit.MoE(moe_config(dedup_threshold=threshold)).eval()
        lib.load_state_dict(layer.state_dict(), strict=False)
        with torch.no_grad():
            _, info = lib(torch.randn(64, D))
        print(
            f"   threshold {threshold}: {info.metrics['dedup_fraction']:.1%} of kept slots merged"
        )

    system.close()
    print(f"done in {time.perf_counter() - start:.1f} s; store: {db}")


if __name__ == "__main__":
    main()
