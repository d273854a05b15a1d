"""The router registry: kind name -> `Router` class and its options dataclass.

Routers import this module to register themselves; `moekit.routing` imports every built-in
router, so the registry module itself knows none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, is_dataclass, replace
from typing import Any

from moekit.config import MoEConfig, RouterOptions, from_dict
from moekit.routing.base import Router

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
        known = ", ".join(map(repr, available_routers()))
        raise ValueError(f"router.kind={kind!r} is not one of {known}")
    return _ROUTERS[kind]


def router_options(kind: str) -> type[RouterOptions]:
    """The options dataclass of router `kind` (the type of RouterConfig.options)."""
    router_class(kind)
    return _OPTIONS[kind]


def build_options(kind: str, given: RouterOptions | dict[str, Any] | None) -> RouterOptions:
    """Router `kind`'s options dataclass from None, a dict, or options (of any router) by name."""
    options_type = router_options(kind)
    if type(given) is options_type:
        return given
    if isinstance(given, RouterOptions):
        given = asdict(given)
    if given is not None and not isinstance(given, dict):
        raise ValueError(f"router.options must be a dict or {options_type.__name__}, got {given!r}")
    return from_dict(options_type, given or {}, f"router.options key(s) of kind {kind!r}")


def resolve_router(cfg: MoEConfig) -> MoEConfig:
    """`cfg` with its router kind checked and its options built; ValueError naming the field."""
    rcfg = cfg.router
    cls = router_class(rcfg.kind)
    if rcfg.constellations is not None and not cls.supports_constellations:
        raise ValueError(f"router.constellations: router.kind={rcfg.kind!r} does not support them")
    options = build_options(rcfg.kind, rcfg.options)
    return cfg if options is rcfg.options else replace(cfg, router=replace(rcfg, options=options))


def build_router(cfg: MoEConfig) -> Router:
    """The router of `cfg`, its kind and options checked here (the config holds plain values)."""
    cfg = resolve_router(cfg)
    return router_class(cfg.router.kind)(cfg)
