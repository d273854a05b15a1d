"""3D forecast plot: a model's autoregressive rollout against the true trajectory."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from moekit.viz.figure import save_figure  # noqa: E402


@torch.no_grad()
def plot_rollouts(
    model: torch.nn.Module,
    paths: Tensor,
    names: tuple[str, ...] | list[str],
    path: str | Path,
    horizon: int = 12,
) -> Path:
    """paths [N, L, 3]: the model sees the first L - horizon points and rolls out the rest."""
    S = paths.shape[1] - horizon
    device = next(model.parameters()).device
    pred = model.generate(paths[:, :S].to(device), horizon).cpu()  # [N, L, 3]
    fig = plt.figure(figsize=(4 * len(names), 4.2))
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1, projection="3d")
        seen, truth, fut = paths[i, :S], paths[i, S - 1 :], pred[i, S - 1 :]
        ax.plot(*seen.T.numpy(), color="grey", lw=1, label="context")
        ax.plot(*truth.T.numpy(), color="tab:blue", lw=1.5, label="truth")
        ax.plot(*fut.T.numpy(), color="tab:red", lw=1.5, ls="--", label="forecast")
        err = (pred[i, S:] - paths[i, S:]).norm(dim=-1).mean()
        ax.set_title(f"{name}\nmean 3D error {err:.3f}", fontsize=9)
        ax.tick_params(labelsize=6)
    fig.axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"3D rollout: {S} context points, {horizon} forecast (predictions fed back)")
    return save_figure(fig, path)
