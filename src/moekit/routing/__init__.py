"""Routers by name. Add one with `@register_router("name", options=MyOptions)` on a `Router`.

The registry is how the config, the layer, the oracle and the server find a router's options
dataclass and its class attributes (`uses_capacity`, `batch_invariant`, `reference`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import is_dataclass
from typing import TYPE_CHECKING

from moekit.config import RouterOptions
from moekit.routing.base import Router
from moekit.types import Routing

if TYPE_CHECKING:
    from moekit.config import MoEConfig

_ROUTERS: dict[str, type[Router]] = {}
_OPTIONS: dict[str, type[RouterOptions]] = {}


def register_router(
    name: str, options: type[RouterOptions] = RouterOptions
) -> Callable[[type[Router]], type[Router]]:
    """Class decorator adding a router as RouterConfig.kind `name`, with its options dataclass.

    `options` (a `RouterOptions` dataclass) is what `RouterConfig.options` becomes for this kind.
    """
    is_options = isinstance(options, type) and issubclass(options, RouterOptions)
    if not (is_options and is_dataclass(options)):
        raise ValueError(f"options of router {name!r} must be a RouterOptions dataclass")

    def wrap(cls: type[Router]) -> type[Router]:
        if name in _ROUTERS and _ROUTERS[name] is not cls:
            raise ValueError(f"router kind {name!r} is already registered")
        _ROUTERS[name] = cls
        _OPTIONS[name] = options
        return cls

    return wrap


def available_routers() -> tuple[str, ...]:
    return tuple(sorted(_ROUTERS))


def router_class(kind: str) -> type[Router]:
    """The router class registered as `kind`."""
    if kind not in _ROUTERS:
        raise ValueError(f"router.kind={kind!r} is not one of {', '.join(available_routers())}")
    return _ROUTERS[kind]


def router_options(kind: str) -> type[RouterOptions]:
    """The options dataclass of router `kind` (the type of RouterConfig.options)."""
    router_class(kind)
    return _OPTIONS[kind]


def build_router(cfg: MoEConfig) -> Router:
    return router_class(cfg.router.kind)(cfg)


from moekit.routing import attention, expert_choice, sigmoid, sinkhorn, topk  # noqa: E402,F401  (registration)

__all__ = [
    "Router",
    "RouterOptions",
    "Routing",
    "available_routers",
    "build_router",
    "register_router",
    "router_class",
    "router_options",
]
