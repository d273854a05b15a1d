"""GARCH(1,1): fitted on the training window only, filtered causally with fixed params."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from arch import arch_model

from moekit.tasks.finance.garch import SCALE, filter_garch, fit_garch, forecast_mean_var


@pytest.fixture
def returns(garch_sim) -> pd.Series:
    idx = pd.bdate_range("2010-01-01", periods=1500)
    return pd.Series(garch_sim(1500, 0.01, seed=5), index=idx)


def test_fit_uses_training_period_only(returns: pd.Series) -> None:
    end = returns.index[999]
    p = fit_garch(returns, end)
    changed = returns.copy()
    changed.iloc[1000:] *= 5.0  # a very different future
    q = fit_garch(changed, end)
    assert p == q
    assert p.n_train == 1000 and p.train_end == end
    # and it matches arch fitted directly on the training slice
    res = arch_model(returns.iloc[:1000].to_numpy() * SCALE, rescale=False).fit(disp="off")
    assert np.isclose(p.alpha, res.params["alpha[1]"], atol=1e-4)
    assert np.isclose(p.beta, res.params["beta[1]"], atol=1e-4)
    # the recovered dynamics are close to the simulated ones (alpha .08, beta .9)
    assert 0.85 < p.persistence < 1.0


def test_fit_refuses_short_training_window(returns: pd.Series) -> None:
    with pytest.raises(ValueError, match="train_end"):
        fit_garch(returns, returns.index[50])


def test_filter_is_causal_and_matches_recursion(returns: pd.Series) -> None:
    p = fit_garch(returns, returns.index[999])
    v = filter_garch(returns, p)
    e2 = (returns.to_numpy() * SCALE - p.mu) ** 2
    assert np.isclose(v.iloc[0], p.omega + p.alpha * e2[0] + p.beta * p.backcast)
    assert np.isclose(v.iloc[5], p.omega + p.alpha * e2[5] + p.beta * v.iloc[4])
    changed = returns.copy()
    changed.iloc[1200:] = 0.3
    w = filter_garch(changed, p)
    np.testing.assert_array_equal(v.iloc[:1200].to_numpy(), w.iloc[:1200].to_numpy())
    # matches arch's own filter with the same fixed parameters (after its backcast fades)
    am = arch_model(returns.to_numpy() * SCALE, rescale=False)
    fixed = am.fix([p.mu, p.omega, p.alpha, p.beta])
    arch_next = fixed.conditional_volatility[1:] ** 2  # sigma^2_t for t = 1.., i.e. v[t-1]
    np.testing.assert_allclose(v.to_numpy()[300:-1], arch_next[300:], rtol=1e-6)


def test_forecast_mean_var_hand_value(returns: pd.Series) -> None:
    p = fit_garch(returns, returns.index[999])
    v, ph = p.long_run_var, p.persistence
    nxt = np.array([2.0 * v])
    expect = v + (1 + ph + ph**2) / 3 * (nxt - v)
    np.testing.assert_allclose(forecast_mean_var(nxt, p, 3), expect)
    np.testing.assert_allclose(forecast_mean_var(nxt, p, 1), nxt)
    with pytest.raises(ValueError, match="horizon"):
        forecast_mean_var(nxt, p, 0)
