"""`trajectories3d`: forecast the next position of 3D trajectories.

Five families, each a category: helices, Kepler orbits (solved from Kepler's equation),
3D Lissajous curves, windows of the Lorenz attractor, and Catmull-Rom splines through
random robot waypoints. Each trajectory is randomly rotated, centred and scaled to unit
spread; the metric is the mean Euclidean error of the next-position forecast.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moekit.model.task import (
    Batch,
    NoiseOptions,
    Task,
    TaskConfig,
    generator,
    pearson,
    register_task,
)

CATEGORIES = ("helix", "kepler", "lissajous3d", "lorenz", "spline")
_LORENZ_BANK = 32  # precomputed attractor runs to cut windows from
_LORENZ_STEPS = 2000


def _u(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def random_rotation(gen: torch.Generator) -> Tensor:
    """A uniformly random 3x3 rotation, from a normalised Gaussian quaternion (w, x, y, z)."""
    w, x, y, z = torch.randn(4, generator=gen).unbind()
    n = (w * w + x * x + y * y + z * z).sqrt()
    w, x, y, z = w / n, x / n, y / n, z / n
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)]),
            torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)]),
            torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]),
        ]
    )


def lorenz_bank(seed: int, split: str, n: int = _LORENZ_BANK, steps: int = _LORENZ_STEPS) -> Tensor:
    """n Lorenz-63 runs (sigma 10, rho 28, beta 8/3), RK4 with dt 0.01 -> [n, steps, 3]."""

    def f(p: Tensor) -> Tensor:
        x, y, z = p.unbind(-1)
        return torch.stack([10 * (y - x), x * (28 - z) - y, x * y - 8 / 3 * z], -1)

    p = torch.randn(n, 3, generator=generator(seed, "lorenz", split), dtype=torch.float64) * 5
    p[:, 2] += 25
    out, dt = [], 0.01
    for i in range(steps + 500):  # 500 burn-in steps land every run on the attractor
        k1 = f(p)
        k2 = f(p + dt / 2 * k1)
        k3 = f(p + dt / 2 * k2)
        k4 = f(p + dt * k3)
        p = p + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if i >= 500:
            out.append(p)
    return torch.stack(out, 1).float()


def kepler(t: Tensor, gen: torch.Generator) -> Tensor:
    """A Keplerian ellipse: mean anomaly M = n t, solve E - e sin E = M by Newton."""
    e = _u(gen, 0.0, 0.7)
    M = 2 * math.pi / _u(gen, 20.0, 60.0) * t + _u(gen, 0, 2 * math.pi)
    E = M.clone()
    for _ in range(12):
        E = E - (E - e * torch.sin(E) - M) / (1 - e * torch.cos(E))
    b = math.sqrt(1 - e * e)
    return torch.stack([torch.cos(E) - e, b * torch.sin(E), torch.zeros_like(E)], -1)


def spline(n: int, gen: torch.Generator) -> Tensor:
    """Catmull-Rom spline through 6 random waypoints, sampled at n points -> [n, 3]."""
    pts = torch.randn(6, 3, generator=gen)
    pts = torch.cat([pts[:1], pts, pts[-1:]])  # repeat the ends so the curve passes them
    s = torch.linspace(0, 5 - 1e-6, n)
    i = s.floor().long()
    u = (s - i)[:, None]
    p0, p1, p2, p3 = pts[i], pts[i + 1], pts[i + 2], pts[i + 3]
    return 0.5 * (
        2 * p1
        + (p2 - p0) * u
        + (2 * p0 - 5 * p1 + 4 * p2 - p3) * u**2
        + (3 * p1 - p0 - 3 * p2 + p3) * u**3
    )


@register_task("trajectories3d", options=NoiseOptions)
class TrajectoriesTask(Task):
    """Input positions up to t, predict the position at t + 1 (d_in = d_out = 3)."""

    categories = CATEGORIES
    metric = "err3d"

    def __init__(self, cfg: TaskConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self._lorenz = {split: lorenz_bank(seed, split) for split in ("train", "val")}

    def model_fields(self) -> dict[str, int | None]:
        return {"vocab_size": None, "d_in": 3, "d_out": 3}

    def trajectory(self, kind: str, n: int, gen: torch.Generator, split: str) -> Tensor:
        """One trajectory of family `kind`, n points, unit spread -> [n, 3]."""
        t = torch.arange(n, dtype=torch.float32)
        if kind == "helix":
            w, climb = 2 * math.pi / _u(gen, 10.0, 40.0), _u(gen, 0.02, 0.1)
            path = torch.stack([torch.cos(w * t), torch.sin(w * t), climb * t], -1)
        elif kind == "kepler":
            path = kepler(t, gen)
        elif kind == "lissajous3d":
            w = 2 * math.pi / _u(gen, 20.0, 50.0)
            f = torch.randint(1, 4, (3,), generator=gen).float()
            d = torch.rand(3, generator=gen) * 2 * math.pi
            path = torch.sin(w * f * t[:, None] + d)
        elif kind == "lorenz":
            bank = self._lorenz[split]
            stride = int(torch.randint(1, 4, (), generator=gen))
            run = int(torch.randint(0, bank.shape[0], (), generator=gen))
            start = int(torch.randint(0, bank.shape[1] - n * stride, (), generator=gen))
            path = bank[run, start : start + n * stride : stride]
        else:
            path = spline(n, gen)
        path = path @ random_rotation(gen).T
        path = path - path.mean(0)
        return path / path.square().sum(-1).mean().sqrt().clamp_min(1e-6)

    def make_batch(self, gen: torch.Generator, batch_size: int, split: str) -> Batch:
        S = self.cfg.seq_len
        cats = torch.randint(0, len(CATEGORIES), (batch_size,), generator=gen)
        paths = torch.stack([self.trajectory(CATEGORIES[int(c)], S + 1, gen, split) for c in cats])
        paths = paths + self.options.noise * torch.randn(paths.shape, generator=gen)  # [B, S+1, 3]
        return Batch(paths[:, :-1], paths[:, 1:], cats[:, None].expand(-1, S).contiguous())

    def metrics(self, out: Tensor, batch: Batch, task_loss: Tensor) -> dict[str, Tensor]:
        err = (out.float() - batch.y).norm(dim=-1)  # [B, S] Euclidean error
        return {
            "err3d": err.mean().detach(),
            "mse": task_loss.detach(),
            "corr": pearson(out, batch.y),
        }

    def rollouts(self, model: torch.nn.Module, per_category: int = 8) -> tuple[Tensor, Tensor, int]:
        """Fresh validation paths of every family and the model's rollout of their last
        `horizon` points: (paths, pred), each [C, N, L, 3], and horizon."""
        gen = generator(self.seed, "plot")
        n = self.cfg.seq_len
        horizon = max(1, n // 4)
        paths = torch.stack(
            [
                torch.stack([self.trajectory(c, n, gen, "val") for _ in range(per_category)])
                for c in CATEGORIES
            ]
        )  # [C, N, n, 3]
        pred = rollout(model, paths.flatten(0, 1), horizon).view(paths.shape)
        return paths, pred, horizon


@torch.no_grad()
def rollout(model: torch.nn.Module, paths: Tensor, horizon: int) -> Tensor:
    """paths [N, L, 3] -> [N, L, 3]: the first L - horizon points, then the model's rollout."""
    device = next(model.parameters()).device
    S = paths.shape[1] - horizon
    return model.generate(paths[:, :S].to(device), horizon).cpu()
