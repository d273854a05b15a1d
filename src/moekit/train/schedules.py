"""Stepping the router schedules (`RouterConfig.schedules`) before each optimiser step."""

from __future__ import annotations

from torch import nn

from moekit.routing.base import Router


class RouterSchedules:
    """The model's routers that anneal options; `__call__(step)` sets them for that step."""

    def __init__(self, model: nn.Module) -> None:
        self.routers = [m for m in model.modules() if isinstance(m, Router) and m.rcfg.schedules]

    def __call__(self, step: int) -> dict[str, float]:
        """Set every scheduled option to its value at `step`; returns them for the log."""
        values: dict[str, float] = {}
        for router in self.routers:
            values.update(router.set_step(step))
        return values
