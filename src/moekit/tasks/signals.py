"""`signals`: forecast the next value of 1D geometric signals.

Nine families, each a category: plain sines, composite harmonics, square and sawtooth
waves, damped oscillations, chirps, and 2D curves (circles, spirals, Lissajous figures)
projected onto a random direction. Periods span 8-40 steps; amplitudes are about 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from moekit.model.task import Batch, NoiseOptions, Task, generator, pearson, register_task

CATEGORIES = (
    "sine",
    "harmonics",
    "square",
    "sawtooth",
    "damped",
    "chirp",
    "circle",
    "spiral",
    "lissajous",
)


def _u(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def make_signal(kind: str, t: Tensor, gen: torch.Generator) -> Tensor:
    """One signal of family `kind` at integer times t [N] -> [N]."""
    w = 2 * math.pi / _u(gen, 8.0, 40.0)  # angular frequency per step
    phase, amp = _u(gen, 0, 2 * math.pi), _u(gen, 0.5, 1.0)
    if kind == "sine":
        return amp * torch.sin(w * t + phase)
    if kind == "harmonics":
        w = w / 2
        parts = [_u(gen, 0.2, 1.0) / n * torch.sin(n * w * t + _u(gen, 0, 6.3)) for n in (1, 2, 3)]
        return amp * sum(parts)  # type: ignore[return-value]
    if kind == "square":
        return amp * torch.sign(torch.sin(w * t + phase))
    if kind == "sawtooth":
        cycles = (w * t + phase) / (2 * math.pi)
        return amp * (2 * (cycles - torch.floor(cycles)) - 1)
    if kind == "damped":
        decay = _u(gen, 0.01, 0.05)
        return 1.5 * torch.exp(-decay * t) * torch.sin(w * t + phase)
    if kind == "chirp":  # frequency sweeps linearly over the sequence
        w0, w1 = 2 * math.pi / 40, 2 * math.pi / _u(gen, 6.0, 12.0)
        sweep = w0 * t + (w1 - w0) * t.square() / (2 * t[-1])
        return amp * torch.sin(sweep + phase)
    angle = _u(gen, 0, math.pi)  # projection direction of a 2D curve
    if kind == "circle":
        x, y = torch.cos(w * t + phase), torch.sin(w * t + phase)
    elif kind == "spiral":
        r = torch.linspace(_u(gen, 0.2, 0.5), _u(gen, 0.8, 1.2), len(t))
        x, y = r * torch.cos(w * t + phase), r * torch.sin(w * t + phase)
    else:  # lissajous: x = sin(a t + d), y = sin(b t) with a/b a small-integer ratio
        a, b = (
            int(torch.randint(1, 4, (), generator=gen)),
            int(torch.randint(1, 4, (), generator=gen)),
        )
        w = w / 2
        x, y = torch.sin(a * w * t + phase), torch.sin(b * w * t)
    return amp * (x * math.cos(angle) + y * math.sin(angle))


@register_task("signals", options=NoiseOptions)
class SignalsTask(Task):
    """Input the signal up to t, predict its value at t + 1 (d_in = d_out = 1)."""

    categories = CATEGORIES
    metric = "mse"

    def model_fields(self) -> dict[str, int | None]:
        return {"vocab_size": None, "d_in": 1, "d_out": 1}

    def make_batch(self, gen: torch.Generator, batch_size: int, split: str) -> Batch:
        S = self.cfg.seq_len
        t = torch.arange(S + 1, dtype=torch.float32)
        cats = torch.randint(0, len(CATEGORIES), (batch_size,), generator=gen)
        series = torch.stack([make_signal(CATEGORIES[int(c)], t, gen) for c in cats])  # [B, S+1]
        series = series + self.options.noise * torch.randn(series.shape, generator=gen)
        x, y = series[:, :-1, None], series[:, 1:, None]  # [B, S, 1]
        return Batch(x=x, y=y, category=cats[:, None].expand(-1, S).contiguous())

    def metrics(self, out: Tensor, batch: Batch, task_loss: Tensor) -> dict[str, Tensor]:
        return {
            "mse": task_loss.detach(),
            "mae": (out - batch.y).abs().mean().detach(),
            "corr": pearson(out, batch.y),
        }

    @torch.no_grad()
    def forecasts(self, model: torch.nn.Module, per_category: int = 16) -> tuple[np.ndarray, ...]:
        """One-step forecasts of fresh sequences of every family: (truth, pred), each [C, N, S]."""
        gen = generator(self.seed, "plot")
        S, N = self.cfg.seq_len, per_category
        t = torch.arange(S + 1, dtype=torch.float32)
        series = torch.stack(
            [torch.stack([make_signal(kind, t, gen) for _ in range(N)]) for kind in CATEGORIES]
        )  # [C, N, S+1]
        series = series + self.options.noise * torch.randn(series.shape, generator=gen)
        x = series[..., :-1].reshape(-1, S, 1)  # [C*N, S, 1]
        was_training = model.training
        model.eval()
        out = model(x.to(next(model.parameters()).device)).out.float().cpu()  # [C*N, S, 1]
        model.train(was_training)
        return series[..., 1:].numpy(), out.reshape(len(CATEGORIES), N, S).numpy()
