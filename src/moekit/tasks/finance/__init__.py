"""Finance task: route market data to asset-class experts and forecast volatility.

Modules: ``data`` (loading), ``clean`` (validation), ``features``, ``garch``, ``rules``
(threshold router baseline), ``model`` (MoE and dense forecasters, trained by
``moekit.train.step``), ``evaluate`` (walk-forward, metrics), ``plots`` and ``pipeline``
(``run_pipeline``, which ``moekit finance demo`` runs).
"""

from moekit.tasks.finance.data import ASSET_CLASSES, Instrument

__all__ = ["ASSET_CLASSES", "Instrument"]
