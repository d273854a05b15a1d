"""Forecasters: input projection -> (MoE | dense MLP) -> log-vol and next-return-sign heads.

The MoE router is pulled towards the rule router early in training: a cross-entropy term
between the router probabilities and the rule class (expert ``i`` <-> ASSET_CLASSES[i])
whose weight halves every ``prior_half_life`` epochs, so the prior seeds the assignment
and the forecasting loss decides later.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import ExpertConfig, MoEConfig, RouterConfig
from moekit.experts import DenseMLP
from moekit.layer import MoE, MoEInfo
from moekit.train.step import StepConfig, StepLoss, TrainStep


def forecast_moe(
    d_model: int = 32, d_hidden: int = 32, n_experts: int = 6, k: int = 1, router: str = "topk"
) -> MoEConfig:
    """The forecaster's MoE layer: dropless, SwiGLU experts without bias.

    At k = 1 the router keeps its raw probability as the gate weight: renormalised it would be
    1 and give the router no task gradient (Switch Transformer style).
    """
    return MoEConfig(
        d_model=d_model,
        d_hidden=d_hidden,
        n_experts=n_experts,
        k=k,
        capacity_factor=None,
        router=RouterConfig(kind=router, renormalize=k > 1),
        expert=ExpertConfig(activation="swiglu", bias=False, init_std=0.1),
    )


@dataclass(frozen=True)
class ForecastConfig:
    """Both forecasters: the MoE layer (its width is the network's), losses, router prior and
    optimisation."""

    moe: MoEConfig = field(default_factory=forecast_moe)
    vol_loss: str = "qlike"  # "qlike" (targets the mean variance) or "mse" (the median)
    sign_weight: float = 0.5
    prior_weight: float = 1.0
    prior_half_life: float = 2.0  # epochs
    epochs: int = 10
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", MoEConfig.from_dict(self.moe))
        if not isinstance(self.moe, MoEConfig):
            raise ValueError(f"moe: expected a MoEConfig, got {type(self.moe).__name__}")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.vol_loss not in ("qlike", "mse"):
            raise ValueError(f"vol_loss: must be 'qlike' or 'mse', got {self.vol_loss!r}")
        for name in ("sign_weight", "prior_weight", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")
        for name in ("lr", "prior_half_life", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")

    def prior_weight_at(self, epoch: int) -> float:
        """Weight of the rule-prior term at ``epoch`` (0-based): halves every half-life."""
        return self.prior_weight * 0.5 ** (epoch / self.prior_half_life)


@dataclass
class ForecastOutput:
    """Per-row outputs: ``logvol`` [N] (standardised), ``sign_logit`` [N], ``aux_loss``
    scalar; for the MoE also ``probs`` [N, E], ``experts`` [N, k], ``weights`` [N, k]."""

    logvol: Tensor
    sign_logit: Tensor
    aux_loss: Tensor
    probs: Tensor | None = None
    experts: Tensor | None = None
    weights: Tensor | None = None


class _Forecaster(nn.Module):
    """Shared input projection and heads; subclasses provide ``block(h) -> (y, info)``."""

    def __init__(self, n_features: int, cfg: ForecastConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.moe.d_model
        self.proj = nn.Linear(n_features, D)
        self.skip = nn.Linear(n_features, 1)  # linear path to the log-vol output
        self.vol_head = nn.Linear(D, 1)
        self.sign_head = nn.Linear(D, 1)

    def block(self, h: Tensor) -> tuple[Tensor, MoEInfo | None]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> ForecastOutput:
        """x [N, F] -> ForecastOutput."""
        h = F.gelu(self.proj(x))  # [N, D]
        y, info = self.block(h)
        z = h + y  # [N, D]
        logvol = (self.vol_head(z) + self.skip(x)).squeeze(-1)  # [N]
        out = ForecastOutput(logvol, self.sign_head(z).squeeze(-1), z.new_zeros(()))
        if info is not None:
            out.aux_loss = info.aux_loss
            out.probs = info.routing.probs
            out.experts = info.routing.experts
            out.weights = info.routing.weights
        return out


class MoEForecaster(_Forecaster):
    """MLP whose hidden block is a ``moekit.MoE`` with one expert per asset class."""

    def __init__(self, n_features: int, cfg: ForecastConfig) -> None:
        super().__init__(n_features, cfg)
        self.moe = MoE(cfg.moe)

    def block(self, h: Tensor) -> tuple[Tensor, MoEInfo]:
        return self.moe(h)

    def active_parameters(self) -> int:
        """Parameters used per row: everything except the non-selected experts."""
        total = sum(p.numel() for p in self.parameters())
        expert = sum(p.numel() for p in self.moe.experts.parameters())
        return total - expert + expert * self.cfg.moe.k // self.cfg.moe.n_experts


class DenseForecaster(_Forecaster):
    """Same network with one dense SwiGLU MLP sized to the MoE's active parameter count."""

    def __init__(self, n_features: int, cfg: ForecastConfig, d_hidden: int) -> None:
        super().__init__(n_features, cfg)
        self.mlp = DenseMLP(
            cfg.moe.d_model, d_hidden, ExpertConfig(activation="swiglu", init_std=0.1)
        )

    def block(self, h: Tensor) -> tuple[Tensor, None]:
        return self.mlp(h), None

    def active_parameters(self) -> int:
        """All parameters are active."""
        return sum(p.numel() for p in self.parameters())


def build_models(n_features: int, cfg: ForecastConfig) -> tuple[MoEForecaster, DenseForecaster]:
    """The MoE forecaster and a dense one with (to within one hidden unit) equal active
    parameters: the dense hidden width absorbs k experts plus the router."""
    torch.manual_seed(cfg.seed)
    moe = MoEForecaster(n_features, cfg)
    per_unit = 3 * cfg.moe.d_model  # SwiGLU: two input columns and one output row per unit
    extra = moe.active_parameters() - sum(
        p.numel() for n, p in moe.named_parameters() if not n.startswith("moe.")
    )
    torch.manual_seed(cfg.seed + 1)
    dense = DenseForecaster(n_features, cfg, max(1, round(extra / per_unit)))
    return moe, dense


def vol_loss(pred: Tensor, target: Tensor, kind: str, scale: float = 1.0) -> Tensor:
    """Loss between standardised log-vol ``pred`` and ``target`` [B]; ``scale`` is the
    log-vol std used to standardise. QLIKE: exp(d) - d - 1 with d = 2 * (log-vol error)."""
    if kind == "mse":
        return F.mse_loss(pred, target)
    d = (2.0 * scale * (target - pred)).clamp(max=8.0)
    return (torch.exp(d) - d - 1.0).mean()


def train_forecaster(
    model: _Forecaster,
    x: np.ndarray,
    y_vol: np.ndarray,
    y_sign: np.ndarray,
    prior: np.ndarray | None,
    y_scale: float = 1.0,
) -> list[float]:
    """Train on x [N, F], standardised log-vol [N] (``y_scale`` = its std in log-vol units),
    sign in {0, 1} [N] and, for the MoE, rule classes [N] as router prior. Returns the mean
    loss per epoch."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(cfg.seed)
    xt, vt = torch.from_numpy(x).float(), torch.from_numpy(y_vol).float()
    st = torch.from_numpy(y_sign).float()
    pt = torch.from_numpy(prior).long() if prior is not None else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_batches = max(1, int(np.ceil(len(xt) / cfg.batch_size)))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * n_batches)
    step = TrainStep(model, StepConfig(max_grad_norm=cfg.grad_clip))
    history = []
    model.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(xt), generator=gen)
        w_prior = cfg.prior_weight_at(epoch)

        def loss(out: ForecastOutput, idx: Tensor, w_prior: float = w_prior) -> StepLoss:
            task = vol_loss(out.logvol, vt[idx], cfg.vol_loss, y_scale)
            task = task + cfg.sign_weight * F.binary_cross_entropy_with_logits(
                out.sign_logit, st[idx]
            )
            prior_term = None
            if pt is not None and out.probs is not None and w_prior > 0:
                logp = torch.log(out.probs.clamp_min(1e-9))  # [B, E]
                prior_term = w_prior * F.nll_loss(logp, pt[idx])
            return StepLoss(task, out.aux_loss, penalty=prior_term)

        total = torch.zeros((), dtype=torch.float64)  # float64: the sum a Python float makes
        for b in range(n_batches):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]  # [B] rows
            record = step(opt, [idx], lambda i: model(xt[i]), loss)
            sched.step()
            total = total + record["loss"].double() * len(idx)
        history.append(_sync_mean(total, len(xt)))
    model.eval()
    return history


def _sync_mean(total: Tensor, n: int) -> float:
    """An epoch's summed loss as a mean. NOTE: host sync, once per epoch."""
    return total.item() / n


@torch.no_grad()
def predict(model: _Forecaster, x: np.ndarray, batch_size: int = 4096) -> dict[str, np.ndarray]:
    """Eval-mode outputs as numpy: ``logvol`` [N], ``sign_prob`` [N] and, for the MoE,
    ``expert`` [N] (top-1), ``expert_weight`` [N], ``probs`` [N, E]."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(x), batch_size):
        out = model(torch.from_numpy(x[i : i + batch_size]).float())
        got = {"logvol": out.logvol, "sign_prob": torch.sigmoid(out.sign_logit)}
        if out.probs is not None:
            got["probs"] = out.probs
            got["expert"] = out.experts[:, 0]
            got["expert_weight"] = out.weights[:, 0]
        for k, v in got.items():
            parts.setdefault(k, []).append(v.detach().cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}
