"""`PagePool`: who holds each page of the paged KV memory, and which prompt blocks pages keep.

A page holds the K/V of `page` consecutive positions of one row, in every layer. A page is
free, held (refcount > 0: listed by the block tables of that many rows), or cached: held by
no row but still holding the K/V of a full prompt block, found by that block's hash until it
is evicted, least recently used first, to make room. Page 0 is scratch: padded positions
write there, so it is never handed out.

A block's hash chains the hashes of every earlier block of its prompt, so equal hashes mean
equal prefixes, whatever the rest of the prompt holds; hits are a run of leading blocks.
The hash is blake2b over the raw values (token ids, or the float32 bytes of input vectors,
so continuous-valued prompts reuse a prefix only when it is bitwise identical).

Rows reserve the pages they may still need when they open, so a running sequence never
finds the pool empty: `available - reserved >= 0` holds at all times.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from torch import Tensor

SCRATCH = 0  # the page padded positions write to; never allocated


class OutOfPages(RuntimeError):
    """No free or evictable page: a reservation was not honoured (a bug, not a load limit)."""


def _sync_block_bytes(prompt: Tensor) -> bytes:
    """A host prompt's raw values (token ids [P] or vectors [P, d]) as bytes."""
    # NOTE: host sync, a plain read: prompts stay host tensors, only their K/V move
    return prompt.contiguous().cpu().numpy().tobytes()


def block_hashes(prompt: Tensor, page: int) -> list[bytes]:
    """Chained hashes of the full `page`-position blocks of `prompt` (tokens or vectors)."""
    n = len(prompt) // page
    if n == 0:
        return []
    data = _sync_block_bytes(prompt[: n * page])
    step = len(data) // n
    out, h = [], b""
    for i in range(n):
        h = hashlib.blake2b(h + data[i * step : (i + 1) * step], digest_size=16).digest()
        out.append(h)
    return out


@dataclass
class PrefixStats:
    lookups: int = 0
    hits: int = 0
    tokens_looked_up: int = 0  # prompt positions asked for
    tokens_reused: int = 0  # prompt positions whose K/V came from cached pages
    evictions: int = 0  # cached pages given to new K/V


class PagePool:
    """Page ids 1..n_pages-1 with refcounts, a hash index of prompt blocks and reservations.

    `cache_pages` bounds the cached pages (held by no row); 0 turns prefix reuse off.
    """

    def __init__(self, n_pages: int, cache_pages: int) -> None:
        if n_pages < 2:
            raise ValueError(f"n_pages={n_pages} must be >= 2 (page 0 is scratch)")
        self.n_pages = n_pages
        self.cache_pages = cache_pages
        self.stats = PrefixStats()
        self.clear()

    @property
    def available(self) -> int:
        """Pages that can be allocated now: free, or cached (evicted on demand)."""
        return len(self.free) + len(self.cached)

    @property
    def held(self) -> int:
        return self.n_pages - 1 - self.available

    def alloc(self) -> int:
        """A page for new K/V, refcount 1; evicts the least recently used cached page if needed."""
        if self.free:
            page = self.free.pop()
        elif self.cached:
            page, _ = self.cached.popitem(last=False)
            self._forget(page)
            self.stats.evictions += 1
        else:
            raise OutOfPages("the KV pages are exhausted")
        self.refs[page] = 1
        return page

    def hold(self, page: int) -> None:
        """One more row lists `page` (a prefix hit); a cached page becomes held again."""
        if self.refs[page] == 0:
            del self.cached[page]
        self.refs[page] += 1

    def drop(self, page: int) -> None:
        """A row stops listing `page`; unheld, it is cached if it keeps a block, else freed."""
        self.refs[page] -= 1
        if self.refs[page]:
            return
        if page in self.hash_of:
            self.cached[page] = None
            while len(self.cached) > self.cache_pages:
                old, _ = self.cached.popitem(last=False)
                self._forget(old)
                self.free.append(old)
                self.stats.evictions += 1
        else:
            self.free.append(page)

    def _forget(self, page: int) -> None:
        del self.index[self.hash_of.pop(page)]

    def match(self, hashes: list[bytes]) -> list[int]:
        """Pages of the leading blocks of `hashes` that some page keeps (not yet held)."""
        pages = []
        for h in hashes:
            page = self.index.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def register(self, page: int, block: bytes) -> None:
        """Let later prompts find `page` by its block hash (the first page to keep it wins)."""
        if self.cache_pages and block not in self.index and page not in self.hash_of:
            self.index[block] = page
            self.hash_of[page] = block

    def clear(self) -> None:
        """Every page free, nothing indexed or reserved (at start, and after a failed step)."""
        self.free = list(range(self.n_pages - 1, SCRATCH, -1))  # pop() hands out low ids first
        self.refs = [0] * self.n_pages
        self.hash_of: dict[int, bytes] = {}
        self.index: dict[bytes, int] = {}
        self.cached: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self.reserved = 0  # pages promised to open rows, not yet allocated
