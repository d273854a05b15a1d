"""Named profiler ranges around the stages of a forward pass, free when no profiler runs.

`moekit profile` reads them back (router, plan, experts, finish, attention). Outside a
profiler `stage` returns a shared null context: no dispatcher call on the hot path.
"""

from __future__ import annotations

import contextlib

import torch.autograd.profiler as autograd_profiler
from torch.profiler import record_function

_NULL = contextlib.nullcontext()


def stage(name: str) -> contextlib.AbstractContextManager:
    """`record_function(name)` while torch's profiler is on, else a no-op context."""
    # torch's own fast flag for "is a profiler running", set by every torch profiler
    if autograd_profiler._is_profiler_enabled:
        return record_function(name)
    return _NULL
