"""`SlotCache`: the server's K/V rows, one per decoding sequence, as an `AttentionCache`.

Each active sequence owns one row ("slot") of a preallocated per-layer store [N, Hkv, L, Dh]
and its own length, so `model(x, cache=slots)` advances rows of different lengths in one
forward: every row stores its new positions after its own past and the returned mask hides
other rows' extra positions. Rows 0..B-1 are the batch (a finished sequence's row is filled
by the last one), so the batch view of the store is a slice, not a gather.

Lengths live on the device, so positions and masks never wait for the host; the host keeps
its own count of the same lengths (set by `load`, grown by each forward) to size the keys
attended, W = the longest row after the step.

Shapes: B batch rows, N slots, L max_seq_len, S new positions, W keys attended, Hkv kv
heads, Dh head size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.model.cache import KVCache
from moekit.model.transformer import Transformer


class SlotCache:
    """Per-layer K/V rows for up to `n_slots` sequences of at most `max_len` positions."""

    def __init__(self, model: Transformer, n_slots: int) -> None:
        cfg = model.cfg
        p = next(model.parameters())
        shape = (n_slots, cfg.kv_heads, cfg.max_seq_len, cfg.head_dim)  # [N, Hkv, L, Dh]
        self.keys = [p.new_zeros(shape) for _ in range(cfg.n_layers)]
        self.values = [p.new_zeros(shape) for _ in range(cfg.n_layers)]
        self.lengths = torch.zeros(n_slots, dtype=torch.long, device=p.device)  # [N]
        self._host_lengths = [0] * n_slots  # the same counts, never read back from the device
        self._steps = torch.arange(cfg.max_seq_len, device=p.device)  # [L]
        self._rows = torch.arange(n_slots, device=p.device)  # [N]
        self.max_len = cfg.max_seq_len

    @property
    def n_slots(self) -> int:
        return len(self._host_lengths)

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    def length(self, row: int) -> int:
        """Positions held by `row`, from the host's count."""
        return self._host_lengths[row]

    def positions(self, batch: int, new: int, device: torch.device) -> Tensor:
        """[B, S]: row b's new positions follow its own length."""
        return self.lengths[:batch, None] + self._steps[:new]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Store k, v [B, Hkv, S, Dh] after each of rows 0..B-1; see `AttentionCache`."""
        B, _, S, _ = k.shape
        width = max(self._host_lengths[:B]) + S
        if width > self.max_len:
            raise ValueError(f"a row of {width - S} positions has no room for {S} more")
        pos = self.positions(B, S, k.device)  # [B, S]
        rows = self._rows[:B, None]  # [B, 1]
        self.keys[layer][rows, :, pos] = k.transpose(1, 2)  # indexed view [B, S, Hkv, Dh]
        self.values[layer][rows, :, pos] = v.transpose(1, 2)
        mask = self._steps[:width] <= pos[:, :, None]  # [B, S, W]
        if layer == self.n_layers - 1:  # every layer has stored this step: the rows grow
            self.lengths[:B] += S
            for b in range(B):
                self._host_lengths[b] += S
        return self.keys[layer][:B, :, :width], self.values[layer][:B, :, :width], mask[:, None]

    def load(self, row: int, cache: KVCache) -> None:
        """Copy a single-sequence KVCache (B = 1, len <= max_len) into `row`."""
        n = len(cache)
        if n > self.max_len:
            raise ValueError(f"cache of {n} positions does not fit max_len={self.max_len}")
        for i in range(self.n_layers):
            k, v = cache.layer(i)  # [1, Hkv, n, Dh]
            self.keys[i][row, :, :n] = k[0]
            self.values[i][row, :, :n] = v[0]
        self.lengths[row] = n
        self._host_lengths[row] = n

    def move(self, src: int, dst: int) -> None:
        """Copy row `src` into row `dst` (compaction after a sequence leaves)."""
        n = self._host_lengths[src]
        for store in (*self.keys, *self.values):
            store[dst, :, :n] = store[src, :, :n]
        self.lengths[dst] = self.lengths[src]
        self._host_lengths[dst] = n

    def to_kv_cache(self, row: int) -> KVCache:
        """A single-sequence KVCache copy of `row` (B = 1)."""
        out = KVCache(self.n_layers)
        n = self._host_lengths[row]
        for i in range(self.n_layers):
            out.append(i, self.keys[i][row : row + 1, :, :n], self.values[i][row : row + 1, :, :n])
        return out
