"""Caches of past keys and values: the `AttentionCache` protocol and the generation `KVCache`.

Attention talks to a cache through two calls, so training, `generate` and the server's batched
slots run one forward (`model(x, cache=..., positions=...)`):

- `positions(B, S, device)`: where the S new positions of each row sit, [S] when every row
  holds the same number of past positions, else [B, S]. These are the RoPE positions unless
  the caller passes its own.
- `update(layer, k, v)`: store k, v [B, Hkv, S, Dh] after each row's past and return the keys
  and values to attend to, [B, Hkv, W, Dh], with a bool mask [B, 1, S, W] of what each new
  position sees; None means every row holds the same W - S past positions (plain causal).

A row's length grows once every layer has stored its new positions. Implementations:
`KVCache` here (rows share one length, storage grows) and the server's paged memory
(`moekit.serve.paged.RowsView` over a `PagedKVCache`: pages [P * page, Hkv, Dh] per layer,
a block table per row, lengths on the device, positions and the mask derived there, writes by
index (scatter), and a static width that a CUDA graph can replay for any lengths; masked keys
cost nothing in the result, so callers never branch on lengths).

Shapes: B sequences, Hkv kv heads, S new positions, W keys attended, Dh head size; `KVCache`
storage per layer [B, Hkv, cap, Dh].
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class AttentionCache(Protocol):
    """Past keys and values of every attention layer, as attention needs them."""

    def positions(self, batch: int, new: int, device: torch.device) -> Tensor:
        """Positions of `new` tokens about to enter each of `batch` rows: [new] or [batch, new]."""
        ...

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Store k, v [B, Hkv, S, Dh]; return keys, values [B, Hkv, W, Dh] and mask [B, 1, S, W]."""
        ...


class KVCache:
    """Per-layer K/V storage for `n_layers` layers; every row of the batch has one length.

    A single sequence (B = 1) is the usual unit of an inference server. Storage grows in place
    with amortised doubling; `prefix` and `select` copy out a shorter cache or some rows, so
    shared prompt prefixes can be reused.
    """

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

    def positions(self, batch: int, new: int, device: torch.device) -> Tensor:
        """[new]: the next positions, the same for every row."""
        n = len(self)
        return torch.arange(n, n + new, device=device)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, None]:
        """`append`, with no mask: rows share one length, so attention is plain causal."""
        k, v = self.append(layer, k, v)
        return k, v, None

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
