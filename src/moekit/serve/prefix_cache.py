"""`PrefixCache`: reuse the K/V of prompt prefixes shared across requests, LRU-bounded by positions.

An entry is a prompt (token ids) with the KV cache its prefill produced. Attention is causal,
so the K/V of the first m positions depend only on the first m tokens: a new prompt sharing m
tokens with any stored prompt can start from that entry's first m positions and prefill only
the rest. Entries are evicted least-recently-used first once the stored positions pass the
bound. Meant for one thread (the engine's worker).

Shapes: P prompt tokens; KV per layer [1, Hkv, P, Dh].
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.model.cache import KVCache


def _sync_key(tokens: Tensor) -> tuple[int, ...]:
    """Token ids [P] as a hashable key."""
    # NOTE: host sync, a plain copy: prompts stay host tensors, only their K/V move
    return tuple(tokens.tolist())


def _sync_shared_prefix(a: Tensor, b: Tensor) -> int:
    """How many leading token ids of a, b [n] agree."""
    # NOTE: host sync, a plain read for the host prompts the engine passes
    return int((a == b).to(torch.int32).cumprod(0).sum())


@dataclass
class PrefixHit:
    """The longest stored prefix of a prompt: `length` positions, as a private KV copy."""

    length: int
    cache: KVCache


@dataclass
class PrefixCacheStats:
    lookups: int = 0
    hits: int = 0
    tokens_looked_up: int = 0  # prompt positions asked for
    tokens_reused: int = 0  # prompt positions served from the cache
    evictions: int = 0


class PrefixCache:
    """LRU map prompt -> KVCache, bounded by the total number of stored positions."""

    def __init__(self, capacity_tokens: int, min_prefix: int = 4) -> None:
        if capacity_tokens < 0 or min_prefix < 1:
            raise ValueError("capacity_tokens must be >= 0 and min_prefix >= 1")
        self.capacity_tokens = capacity_tokens
        self.min_prefix = min_prefix
        self._entries: OrderedDict[tuple[int, ...], tuple[Tensor, KVCache]] = OrderedDict()
        self.tokens = 0  # positions stored over all entries
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: Tensor, limit: int) -> PrefixHit | None:
        """Longest stored prefix of `prompt` [P] of at most `limit` positions, or None.

        `limit` is at most P - 1 in practice: the last prompt position must still be fed
        to get the logits of the first new token.
        """
        self.stats.lookups += 1
        self.stats.tokens_looked_up += int(prompt.numel())
        best, best_key = 0, None
        for key, (tokens, _) in self._entries.items():
            n = min(len(tokens), int(prompt.numel()), limit)
            if n <= best:
                continue
            m = _sync_shared_prefix(tokens[:n], prompt[:n])
            if m > best:
                best, best_key = m, key
        if best_key is None or best < self.min_prefix:
            return None
        self._entries.move_to_end(best_key)
        self.stats.hits += 1
        self.stats.tokens_reused += best
        return PrefixHit(best, self._entries[best_key][1].prefix(best))

    def insert(self, prompt: Tensor, cache: KVCache) -> None:
        """Store a prompt [P] with the KV of its first len(cache) positions (copied)."""
        n = min(len(cache), int(prompt.numel()))
        if n < self.min_prefix or n > self.capacity_tokens:
            return
        key = _sync_key(prompt[:n])
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        self._entries[key] = (prompt[:n].clone(), cache.prefix(n))
        self.tokens += n
        while self.tokens > self.capacity_tokens:
            _, (tokens, _) = self._entries.popitem(last=False)
            self.tokens -= len(tokens)
            self.stats.evictions += 1

    def contains(self, prompt: Tensor) -> bool:
        return _sync_key(prompt) in self._entries
