"""GARCH(1,1) fitted on a training window only, then filtered forward with fixed parameters.

Fitting uses ``arch``; filtering is an explicit causal recursion so that the conditional
variance at date ``t`` depends only on returns up to ``t`` and on parameters estimated from
data up to the training cut-off.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from arch import arch_model

#: Returns are scaled to percent for a well-conditioned fit.
SCALE = 100.0
#: Number of leading squared residuals used for the initial variance (exponential weights).
BACKCAST_LAGS = 75


@dataclass(frozen=True)
class GarchParams:
    """Constant-mean GARCH(1,1) parameters in percent units, plus the training cut-off."""

    mu: float
    omega: float
    alpha: float
    beta: float
    backcast: float
    train_end: pd.Timestamp
    n_train: int

    @property
    def persistence(self) -> float:
        """alpha + beta; below 1 means the variance mean-reverts."""
        return self.alpha + self.beta

    @property
    def long_run_var(self) -> float:
        """Unconditional variance (percent^2), or the backcast if not stationary."""
        p = self.persistence
        return self.omega / (1.0 - p) if p < 1.0 else self.backcast


def _backcast(resid: np.ndarray) -> float:
    tau = min(BACKCAST_LAGS, len(resid))
    w = 0.94 ** np.arange(tau)
    return float(np.sum(resid[:tau] ** 2 * w / w.sum()))


def fit_garch(returns: pd.Series, train_end: pd.Timestamp, min_obs: int = 100) -> GarchParams:
    """Fit GARCH(1,1) by maximum likelihood on ``returns`` dated on or before ``train_end``."""
    train = returns.loc[:train_end]
    if len(train) < min_obs:
        raise ValueError(
            f"train_end: only {len(train)} returns up to {pd.Timestamp(train_end).date()}, "
            f"GARCH needs at least {min_obs}"
        )
    y = train.to_numpy(dtype=float) * SCALE
    model = arch_model(y, mean="Constant", vol="GARCH", p=1, q=1, dist="normal", rescale=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = model.fit(disp="off", show_warning=False)
    p = res.params
    mu = float(p["mu"])
    return GarchParams(
        mu=mu,
        omega=float(p["omega"]),
        alpha=float(p["alpha[1]"]),
        beta=float(p["beta[1]"]),
        backcast=_backcast(y - mu),
        train_end=pd.Timestamp(train_end),
        n_train=len(train),
    )


def filter_garch(returns: pd.Series, params: GarchParams) -> pd.Series:
    """One-step-ahead conditional variance (percent^2) made at each date.

    Entry ``t`` is ``sigma^2_{t+1|t} = omega + alpha * e_t^2 + beta * sigma^2_{t|t-1}``: it
    uses the return at ``t`` and earlier only. The recursion starts from the training
    backcast, so values do not depend on anything after the training window's start.
    """
    e2 = ((returns.to_numpy(dtype=float) * SCALE) - params.mu) ** 2
    out = np.empty_like(e2)
    s2 = params.backcast  # sigma^2_{0|-1}
    for t in range(len(e2)):
        s2 = params.omega + params.alpha * e2[t] + params.beta * s2
        out[t] = s2
    return pd.Series(out, index=returns.index, name="garch_var")


def forecast_mean_var(next_var: np.ndarray, params: GarchParams, horizon: int) -> np.ndarray:
    """Average expected variance over the next ``horizon`` periods given ``sigma^2_{t+1|t}``.

    Uses ``E[sigma^2_{t+j}] = v + p^(j-1) (sigma^2_{t+1|t} - v)`` with ``p = alpha + beta``
    and ``v`` the long-run variance.
    """
    if horizon < 1:
        raise ValueError(f"horizon: must be >= 1, got {horizon}")
    p, v = params.persistence, params.long_run_var
    if p >= 1.0:
        return np.asarray(next_var, dtype=float)
    decay = np.mean(p ** np.arange(horizon))
    return v + decay * (np.asarray(next_var, dtype=float) - v)
