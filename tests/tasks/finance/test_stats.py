import math

import numpy as np
import pytest
from scipy import stats

from moekit.tasks.finance.stats import diebold_mariano, mean_ci


def test_one_step_dm_is_the_t_test_of_the_loss_differential():
    d = np.random.default_rng(0).normal(0.3, 1.0, 200)
    res = diebold_mariano(d, horizon=1)
    t = stats.ttest_1samp(d, 0.0)
    assert res.stat == pytest.approx(t.statistic) and res.p_value == pytest.approx(t.pvalue)
    assert res.stat > 0 and res.n == 200


def test_overlapping_forecasts_widen_the_variance():
    rng = np.random.default_rng(1)
    shocks = rng.normal(0.0, 1.0, 505)
    d = 0.2 + np.convolve(shocks, np.ones(5) / 5, mode="valid")  # MA(4): a 5-step overlap
    assert abs(diebold_mariano(d, 5).stat) < abs(diebold_mariano(d, 1).stat)
    assert math.isnan(diebold_mariano(np.zeros(20), 1).stat)  # identical forecasts
    with pytest.raises(ValueError, match="too few"):
        diebold_mariano(np.ones(5), 5)


def test_mean_ci_uses_the_t_distribution():
    ci = mean_ci([1.0, 2.0, 3.0])
    half = stats.t.ppf(0.975, 2) / math.sqrt(3)
    assert (ci.mean, ci.low, ci.high, ci.n) == pytest.approx((2.0, 2.0 - half, 2.0 + half, 3))
    one = mean_ci([4.0])
    assert one.mean == 4.0 and math.isnan(one.low)
    with pytest.raises(ValueError, match="level"):
        mean_ci([1.0, 2.0], level=1.5)
