"""`moekit_triton::*` custom ops that eager callers step around.

torch.compile needs each launcher as an opaque op (a custom op with a fake); an eager caller
does not, and the custom-op dispatcher costs tens of microseconds of host time per call,
more than the kernels of a decode step. `triton_op` registers the op and returns a function
that calls it while torch.compile traces and the plain Python body otherwise: the same code
runs either way. `.custom` is the registered op (for opcheck), `.register_fake` its fake.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch


def triton_op(name: str, mutates_args: tuple[str, ...] = ()) -> Callable[[Callable], Any]:
    """Decorator: `torch.library.custom_op(name)` for torch.compile, the body itself eagerly."""

    def wrap(fn: Callable) -> Any:
        custom = torch.library.custom_op(name, mutates_args=mutates_args)(fn)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if torch.compiler.is_compiling():
                return custom(*args, **kwargs)
            return fn(*args, **kwargs)

        call.custom = custom  # type: ignore[attr-defined]
        call.register_fake = custom.register_fake  # type: ignore[attr-defined]
        return call

    return wrap
