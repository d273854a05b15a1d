"""`KVCache`: keys and values of past positions, one entry per attention layer.

A cache holds a batch of sequences that share one length (a single sequence when B = 1, the
usual unit of an inference server). It grows in place with amortised doubling; `prefix` and
`select` copy out a shorter cache or some sequences, so shared prompt prefixes can be reused.

Shapes: B sequences, H kv heads, S positions, Dh head size; storage per layer [B, H, cap, Dh].
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Per-layer K/V storage for `n_layers` attention layers."""

    def __init__(self, n_layers: int) -> None:
        self.keys: list[Tensor | None] = [None] * n_layers  # [B, H, cap, Dh]
        self.values: list[Tensor | None] = [None] * n_layers
        self.lengths = [0] * n_layers

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    def __len__(self) -> int:
        """Positions stored (that every layer has seen)."""
        return min(self.lengths) if self.lengths else 0

    @property
    def batch_size(self) -> int:
        k = self.keys[0]
        return 0 if k is None else k.shape[0]

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add k, v [B, H, S, Dh] at the end of `layer`; return that layer's full K, V."""
        n, S = self.lengths[layer], k.shape[2]
        store = self.keys[layer]
        if store is None or n + S > store.shape[2]:
            self._grow(layer, k, v, n + S)
        self.keys[layer][:, :, n : n + S] = k  # type: ignore[index]
        self.values[layer][:, :, n : n + S] = v  # type: ignore[index]
        self.lengths[layer] = n + S
        return self.keys[layer][:, :, : n + S], self.values[layer][:, :, : n + S]  # type: ignore[index]

    def _grow(self, layer: int, k: Tensor, v: Tensor, need: int) -> None:
        B, H, _, Dh = k.shape
        old = self.keys[layer]
        cap = max(need, 2 * (0 if old is None else old.shape[2]), 16)
        new_k = k.new_empty(B, H, cap, Dh)
        new_v = v.new_empty(B, H, cap, Dh)
        n = self.lengths[layer]
        if old is not None and n:
            new_k[:, :, :n] = old[:, :, :n]
            new_v[:, :, :n] = self.values[layer][:, :, :n]  # type: ignore[index]
        self.keys[layer], self.values[layer] = new_k, new_v

    def layer(self, layer: int) -> tuple[Tensor, Tensor]:
        """Stored K, V [B, H, len, Dh] of one layer (views, not copies)."""
        n = self.lengths[layer]
        return self.keys[layer][:, :, :n], self.values[layer][:, :, :n]  # type: ignore[index]

    def _copy(self, positions: slice, batch: Tensor | slice) -> KVCache:
        out = KVCache(self.n_layers)
        for i in range(self.n_layers):
            if self.keys[i] is None:
                continue
            k, v = self.layer(i)
            out.keys[i] = k[batch][:, :, positions].clone()
            out.values[i] = v[batch][:, :, positions].clone()
            out.lengths[i] = out.keys[i].shape[2]  # type: ignore[union-attr]
        return out

    def prefix(self, n: int) -> KVCache:
        """A copy holding the first n positions (a shared prompt prefix)."""
        if not 0 <= n <= len(self):
            raise ValueError(f"prefix length {n} must be in [0, {len(self)}]")
        return self._copy(slice(0, n), slice(None))

    def clone(self) -> KVCache:
        return self._copy(slice(None), slice(None))

    def select(self, index: int | list[int] | Tensor) -> KVCache:
        """A copy holding some sequences of the batch, e.g. `cache.select(i)` for one."""
        idx = torch.as_tensor([index] if isinstance(index, int) else index, dtype=torch.long)
        return self._copy(slice(None), idx)

    @staticmethod
    def stack(caches: list[KVCache]) -> KVCache:
        """Concatenate caches of equal length along the batch (sequences decoded together)."""
        if len({len(c) for c in caches}) != 1:
            raise ValueError("KVCache.stack needs caches of equal length")
        out = KVCache(caches[0].n_layers)
        for i in range(out.n_layers):
            if caches[0].keys[i] is None:
                continue
            out.keys[i] = torch.cat([c.layer(i)[0] for c in caches])
            out.values[i] = torch.cat([c.layer(i)[1] for c in caches])
            out.lengths[i] = caches[0].lengths[i]
        return out

    def truncate(self, n: int) -> None:
        """Forget positions >= n in place (e.g. rejected draft tokens)."""
        self.lengths = [min(length, n) for length in self.lengths]
