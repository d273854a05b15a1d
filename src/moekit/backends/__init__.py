"""Stage 3 of the layer: compute the routed experts given a `Plan`.

A backend is one registered `Backend` object; add one with `@register_backend(name, priority)`
on a subclass. Its contracts (w: `ExpertWeights`, any strides)::

    forward(x_TD, plan, w, activation) -> y_TD
    per_slot(x_SD, offsets_E1, w, activation) -> out_ND

forward: y_TD[t] = sum over t's kept slots of weight * expert(x_t), in x's dtype.
per_slot: rows already sorted by expert (`dispatch.gather`), expert e on rows
offsets_E1[e]:offsets_E1[e + 1], unweighted; N rows with offsets_E1[E] <= N <= S, zero past
the kept ones. `dispatch.combine` turns them into y_TD, so callers that need every slot's own
output (expert parallelism, the librarian) share one combine. Optional: `make_plan` (a faster
dropless plan) and `select` (a fused router selection); None from either means "use the torch
code". Backends never change what is computed: each matches `moekit.reference` in the tests.
"""

# registration: each module registers its backend class
from moekit.backends import grouped_mm, torch, triton  # noqa: E402,F401,I001
from moekit.backends.base import (
    Backend,
    Bound,
    available_backends,
    check_backend,
    get_backend,
    register_backend,
    unsupported_reason,
)

__all__ = [
    "Backend",
    "Bound",
    "available_backends",
    "check_backend",
    "get_backend",
    "register_backend",
    "unsupported_reason",
]
