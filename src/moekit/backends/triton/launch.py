"""Launch with a fallback: a config that does not fit this GPU's shared memory is retried
smaller, once per process.

The tables are sized by an estimate (`configs.gemm_smem`); the compiler's own count can be
larger (layout-conversion scratch, another GPU's limit). On `OutOfResources` the launch is
retried with num_stages lowered one step at a time down to 1, then the named block sizes
halved in turn; the config that launched is remembered per (kernel, config, operand dtypes),
so later calls go straight to it, and one warning names the kernel and the reduced config.
This is host code at launch time: it adds no device sync and leaves the custom ops as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

from moekit.backends.triton.configs import MIN_BLOCK

try:  # the exception Triton raises when a compiled kernel exceeds a hardware limit
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - other triton layouts

    class OutOfResources(Exception):  # type: ignore[no-redef]
        """Stand-in when triton does not export the exception (it then never matches)."""


_LOG = logging.getLogger(__name__)
_WORKING: dict[tuple, dict] = {}  # (kernel, frozen config, extra) -> config that launched


def _smaller(cfg: dict, shrink: tuple[str, ...]) -> dict | None:
    """The next config to try: one stage fewer, then the first shrinkable block halved."""
    if cfg["num_stages"] > 1:
        return dict(cfg, num_stages=cfg["num_stages"] - 1)
    for name in shrink:
        if cfg.get(name, 0) > MIN_BLOCK:
            return dict(cfg, **{name: cfg[name] // 2})
    return None


def launch_with_retry(
    kernel: str,
    cfg: dict,
    run: Callable[[dict], None],
    shrink: tuple[str, ...] = ("block_k", "block_n"),
    extra: Hashable = (),
) -> dict:
    """run(cfg), retried with smaller configs on OutOfResources; returns the config that ran.

    kernel names the kernel in the cache key and the warning; extra (e.g. the operand dtypes)
    joins the key. Errors other than OutOfResources, and the last one when nothing smaller is
    left, propagate.
    """
    key = (kernel, tuple(sorted(cfg.items())), extra)
    first = _WORKING.get(key, cfg)
    current = first
    while True:
        try:
            run(current)
        except OutOfResources as err:
            smaller = _smaller(current, shrink)
            if smaller is None:
                raise
            _LOG.debug("%s: %s with %s; retrying with %s", kernel, err, current, smaller)
            current = smaller
            continue
        if current is not first:
            _WORKING[key] = current
            _LOG.warning(
                "triton kernel %s ran out of resources with %s; using the reduced config %s "
                "from now on in this process",
                kernel,
                cfg,
                current,
            )
        return current
