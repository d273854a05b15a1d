"""`DecodeStep`: one decode position for every live row, replayed from CUDA graphs on the GPU.

On the GPU the fused MoE kernels pay off only when launched from a graph (a layer at T = 1
replays in tens of microseconds but takes hundreds eagerly), so the decode forward is
captured at start-up once per batch-size bucket, and each step pads its live rows to the
next bucket and replays. What the graph reads are static buffers: the row ids (padding
points at the cache's always-empty pad row), each row's next input, and the cache's block
table and lengths. Padding rows write to the scratch page and add nothing to lengths or
expert counts, so a padded step equals an unpadded one row for row.

Modes: "graphs" captures (and decodes eagerly, saying why in the log, when capture fails);
"static" runs the bucketed computation the graphs hold without capturing it (CPU tests check
it equals "eager"); "eager" attends only to the pages the live rows hold.

Shapes: B live rows, b bucket size, N rows, V vocabulary (or d_out), L MoE layers, E experts.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from moekit.layer import MoEInfo
from moekit.model.transformer import Transformer
from moekit.replay import capture
from moekit.serve.paged import PagedKVCache

log = logging.getLogger(__name__)
BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # captured batch sizes; past 64, steps of 32
MODES = ("graphs", "static", "eager")


def buckets_for(max_batch: int) -> tuple[int, ...]:
    """Bucket sizes up to max_batch, which is always the last one."""
    sizes = [b for b in BUCKETS if b < max_batch]
    sizes += list(range(96, max_batch, 32))
    return (*sizes, max_batch)


def count_routed(counts_LE: Tensor, infos: list[MoEInfo | None], valid_T: Tensor | None) -> None:
    """Add each MoE layer's routed token-slots to counts [L, E] on the device.

    Dropped slots (-1) and positions where valid [T] is False (padding) add nothing.
    """
    moe = [info for info in infos if info is not None]
    for counts_E, info in zip(counts_LE, moe, strict=True):
        experts_TK = info.routing.experts
        keep_TK = experts_TK >= 0
        if valid_T is not None:
            keep_TK = keep_TK & valid_T[:, None]
        counts_E.scatter_add_(0, experts_TK.clamp(min=0).flatten(), keep_TK.flatten().long())


class DecodeStep:
    """Decode forward for the rows given: padded to a bucket, replayed, static or eager.

    `inputs` [N + 1, 1] tokens (or [N + 1, 1, d_in] vectors) holds each row's next input;
    `counts` [L, E] receives the routed token-slots of live rows.
    """

    def __init__(
        self,
        model: Transformer,
        kv: PagedKVCache,
        inputs: Tensor,
        counts: Tensor,
        max_batch: int,
        mode: str,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"decode mode={mode!r} is not one of {MODES}")
        self.model, self.kv, self.inputs, self.counts = model, kv, inputs, counts
        self.buckets = buckets_for(max_batch)
        dev = kv.device
        self.rows = torch.full((max_batch,), kv.pad_row, dtype=torch.long, device=dev)  # [b]
        pinned = dev.type == "cuda"
        self._host = torch.full((max_batch,), kv.pad_row, dtype=torch.long, pin_memory=pinned)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.mode = mode
        self.fallback: str | None = None  # why graphs were asked for and not used
        if mode == "graphs":
            self._capture()

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _forward(self, b: int) -> Tensor:
        """The captured computation: rows[:b] (padding included) advance one position."""
        rows = self.rows[:b]
        live = rows != self.kv.pad_row  # [b]
        x = self.inputs[rows]  # [b, 1] or [b, 1, d_in]
        out = self.model(x, cache=self.kv.static_view(rows, live.long()))
        count_routed(self.counts, out.layers, live)
        return out.out[:, -1]  # [b, V]

    def _capture(self) -> None:
        if self.kv.device.type != "cuda":
            self._fall_back("CUDA graphs need a CUDA device")
            return
        pool = None
        try:
            for b in reversed(self.buckets):  # largest first: the others reuse its memory pool
                forward = functools.partial(self._forward, b)
                graph, out = capture(forward, self.kv.device, pool, error_mode="thread_local")
                pool = graph.pool()
                self.graphs[b] = (graph, out)
        except Exception as err:  # e.g. a backend that reads counts on the host
            self.graphs.clear()
            self._fall_back(f"capture failed: {type(err).__name__}: {err}")
            return
        log.info("decode captured in CUDA graphs for batch sizes %s", list(self.buckets))

    def _fall_back(self, reason: str) -> None:
        self.mode, self.fallback = "eager", reason
        log.warning("decoding eagerly, without CUDA graphs: %s", reason)

    def __call__(self, rows: list[int]) -> Tensor:
        """Outputs [B, V] at the new position of each of `rows` (the cache grows by one)."""
        B = len(rows)
        if self.mode == "eager":
            view = self.kv.view(rows, [1] * B)
            out = self.model(self.inputs[view.rows], cache=view)
            count_routed(self.counts, out.layers, None)
            return out.out[:, -1]
        b = self.bucket(B)
        host = self._host.numpy()  # pinned: the copy below does not wait for the device
        host[:B], host[B:b] = rows, self.kv.pad_row
        self.rows[:b].copy_(self._host[:b], non_blocking=True)
        if b in self.graphs:
            graph, out = self.graphs[b]
            graph.replay()
            return out[:B]
        return self._forward(b)[:B]
