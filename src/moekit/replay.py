"""Small inference batches replayed as CUDA graphs, so eager callers do not pay the launches.

At decode sizes an MoE layer's GPU work is tens of microseconds, but its dozen or more kernel
launches through Python cost around a millisecond of host time. `GraphReplay` captures a
row-wise function once per bucket of rows (1, 2, 4, ... `max_rows`) and replays it: the
inputs are copied into the graph's static buffers (zero-padded up to the bucket), and the
caller gets a private copy of the outputs cut back to its rows, so a result held across
calls never changes. One copy out serves every output: the captured function ends by
packing them into one byte buffer.

Padding is only sound for functions whose every output row depends on its own input row
alone (batch-invariant routing, no capacity): the caller decides that. `usable` says where a
graph cannot run at all: off CUDA, while autograd records, inside another capture or
torch.compile.

Shape legend: R rows of the call, B its bucket (a power of two >= R).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

_LOG = logging.getLogger(__name__)
_ALIGN = 16  # bytes: every packed output starts aligned for any dtype's view


@dataclass(frozen=True)
class _Slot:
    """Where one output lies in the packed buffer: None outputs have no slot."""

    offset: int
    n_bytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]  # at the bucket's rows


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, ...]  # each [B, ...]: the static inputs
    packed: Tensor  # [n] uint8 static outputs
    slots: tuple[_Slot | None, ...]


def bucket(rows: int) -> int:
    """The captured size serving `rows`: the next power of two."""
    return 1 << max(rows - 1, 0).bit_length()


def _pack(outputs: tuple[Tensor | None, ...]) -> tuple[Tensor, tuple[_Slot | None, ...]]:
    """One uint8 buffer holding every output, each at an aligned offset."""
    parts, slots, offset = [], [], 0
    device = next(t.device for t in outputs if t is not None)
    for t in outputs:
        if t is None:
            slots.append(None)
            continue
        raw = t.contiguous().reshape(-1).view(torch.uint8)
        pad = -raw.numel() % _ALIGN
        parts += [raw, raw.new_zeros(pad)] if pad else [raw]
        slots.append(_Slot(offset, raw.numel(), t.dtype, tuple(t.shape)))
        offset += raw.numel() + pad
    packed = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=device)
    return packed, tuple(slots)


def _unpack(buf: Tensor, slots: tuple[_Slot | None, ...], rows: int) -> tuple[Tensor | None, ...]:
    """Views of a packed copy, each cut to the caller's rows."""
    out: list[Tensor | None] = []
    for s in slots:
        if s is None:
            out.append(None)
            continue
        t = buf[s.offset : s.offset + s.n_bytes].view(s.dtype).view(s.shape)
        out.append(t[:rows])
    return tuple(out)


def capture(
    fn: Callable[[], Any],
    device: torch.device,
    pool: Any = None,
    error_mode: str = "global",
    warmup: int = 1,
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(graph, fn's outputs as static tensors): fn run `warmup` times on a side stream (kernels
    compiled and tuned, workspaces sized outside the capture), then captured into a graph.

    `pool` shares one memory pool between graphs (capture the largest first). The one capture
    helper of moekit: the layer's replay, the HF adapter's and the server's decode step.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool, capture_error_mode=error_mode):
            out = fn()
    except RuntimeError:
        _end_rng_capture(device)
        raise
    return graph, out


def _end_rng_capture(device: torch.device) -> None:
    """Take the CUDA generator out of capture after a failed one.

    A capture that fails ends before the generator's capture epilogue runs, so every later
    eager random op would fail ("Offset increment outside graph capture"). Capturing an empty
    graph runs the prologue and epilogue again and leaves the generator as it was.
    """
    with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=torch.cuda.Stream(device)):
        pass


class GraphReplay:
    """fn(*inputs, each [R, ...]) -> tuple of [R, ...] tensors (or None), from CUDA graphs.

    `state` lists the tensors fn reads besides its inputs (parameters, buffers): a graph reads them
    where they lie, so in-place updates are seen, and a tensor moved elsewhere gets a new
    graph. At most `max_graphs` graphs are kept (least recently used goes first).
    """

    def __init__(
        self,
        fn: Callable[..., tuple[Tensor | None, ...]],
        state: Callable[[], Iterable[Tensor]],
        max_rows: int,
        max_graphs: int = 8,
    ) -> None:
        self.fn, self.state, self.max_rows, self.max_graphs = fn, state, max_rows, max_graphs
        self._entries: OrderedDict[tuple, _Entry | None] = OrderedDict()  # None: not capturable
        self._pool = None

    def __getstate__(self) -> dict:
        """Copies (deepcopy, pickling a module) start with no graphs: they capture their own."""
        return {**self.__dict__, "_entries": OrderedDict(), "_pool": None}

    def usable(self, *inputs: Tensor) -> bool:
        """Whether a replay may stand in for fn(*inputs) here (metadata only, no sync)."""
        rows = inputs[0].shape[0]
        return (
            all(t.is_cuda and t.shape[0] == rows for t in inputs)
            and 0 < rows <= self.max_rows
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing()
        )

    def __call__(self, *inputs: Tensor) -> tuple[Tensor | None, ...] | None:
        """fn(*inputs) from a replay, or None where no graph could be captured (call fn)."""
        device = inputs[0].device
        rows, rows_b = inputs[0].shape[0], bucket(inputs[0].shape[0])
        state = tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in self.state())
        autocast = torch.is_autocast_enabled(device.type)
        key = (rows_b, device, torch.is_inference_mode_enabled(), autocast)
        key += (torch.get_autocast_dtype(device.type) if autocast else None,)
        key += tuple((tuple(t.shape[1:]), t.dtype) for t in inputs) + state
        if key not in self._entries:
            self._entries[key] = self._capture(inputs, rows_b)
            while len(self._entries) > self.max_graphs:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        entry = self._entries[key]
        if entry is None:
            return None
        for static, t in zip(entry.inputs, inputs, strict=True):
            static[:rows].copy_(t)
            if rows < rows_b:
                static[rows:].zero_()
        entry.graph.replay()
        return _unpack(entry.packed.clone(), entry.slots, rows)

    def _capture(self, inputs: tuple[Tensor, ...], rows_b: int) -> _Entry | None:
        """Warm fn up on a side stream (compiles kernels, sizes workspaces), then capture it."""
        static = tuple(t.new_zeros(rows_b, *t.shape[1:]) for t in inputs)
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph, (packed, slots) = capture(
                lambda: _pack(self.fn(*static)), inputs[0].device, self._pool, warmup=2
            )
        except RuntimeError as err:  # e.g. an op that syncs with the host
            _LOG.warning("no CUDA graph for %d rows (%s): running eagerly", rows_b, err)
            return None
        return _Entry(graph, static, packed, slots)
