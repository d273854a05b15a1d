"""Routers by name. Add one with `@register_router("name", options=MyOptions)` on a `Router`.

The registry is how the layer, the oracle and the server find a router's options dataclass and
its class attributes (`uses_capacity`, `batch_invariant`, `reference`). The config holds only
names and values: `build_router` checks the kind and builds the options when a layer is made.
"""

from moekit.routing import attention, expert_choice, sigmoid, sinkhorn, topk  # noqa: F401  (registration)
from moekit.routing.base import Router
from moekit.routing.registry import (
    RouterOptions,
    available_routers,
    build_options,
    build_router,
    register_router,
    resolve_router,
    router_class,
    router_options,
)
from moekit.types import Routing

__all__ = [
    "Router",
    "RouterOptions",
    "Routing",
    "available_routers",
    "build_options",
    "build_router",
    "register_router",
    "resolve_router",
    "router_class",
    "router_options",
]
