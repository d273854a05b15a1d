"""Routers by name. Add one with `@register_router("name")` on a `Router` subclass."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from moekit.routing.base import Router, Routing

if TYPE_CHECKING:
    from moekit.config import MoEConfig

_ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    """Class decorator adding a router under `name` (usable as RouterConfig.kind)."""

    def wrap(cls: type[Router]) -> type[Router]:
        if name in _ROUTERS and _ROUTERS[name] is not cls:
            raise ValueError(f"router kind {name!r} is already registered")
        _ROUTERS[name] = cls
        return cls

    return wrap


def available_routers() -> tuple[str, ...]:
    return tuple(sorted(_ROUTERS))


def build_router(cfg: MoEConfig) -> Router:
    return _ROUTERS[cfg.router.kind](cfg)


from moekit.routing import attention, expert_choice, sigmoid, sinkhorn, topk  # noqa: E402,F401  (registration)

__all__ = ["Router", "Routing", "available_routers", "build_router", "register_router"]
