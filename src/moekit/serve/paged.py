"""`PagedKVCache`: the server's K/V memory in fixed-size pages, and `RowsView`, its cache protocol.

Every layer stores K and V as pages of `page` positions in one flat buffer [P * page, Hkv, Dh];
a serving row (one sequence) lists its pages in a block table row [M] and has a length. Rows
that share a prompt prefix list the same pages (`PagePool` counts holders), so a prefix hit
copies nothing. The block table, lengths and K/V live on the device; the host keeps its own
copy of each row's pages and length (never read back) to size work and allocate pages.

`RowsView` hands some rows to `model(x, cache=view)` (the `AttentionCache` protocol): row b
stores its `new[b]` real positions after its length (padding positions write to the scratch
page), then attends to its first `pages` pages, masked to what each position may see. Eager
views size `pages` to the longest row; static views use M, so a CUDA graph captured on one
replays for any lengths. A view serves one forward pass.

Shapes: N rows (+1 padding row), M pages per row, P pages, B rows in a view, S new positions,
W = pages * page keys attended, Hkv kv heads, Dh head size.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from moekit.model.transformer import Transformer
from moekit.serve.pages import SCRATCH, PagePool

GIB = 1 << 30
CPU_KV_BYTES = GIB  # the --kv-memory budget on CPU when none is given
GPU_KV_FRACTION = 0.8  # of the GPU memory free after loading, when none is given
_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": GIB, "t": 1 << 40}


def page_bytes(model: Transformer, page: int) -> int:
    """Bytes of one page: K and V of `page` positions in every layer."""
    cfg = model.cfg
    itemsize = next(model.parameters()).element_size()
    return 2 * cfg.n_layers * page * cfg.kv_heads * cfg.head_dim * itemsize


def kv_budget(spec: str, device: torch.device) -> int:
    """Bytes for K/V pages from `--kv-memory`: 'auto', a fraction of free GPU memory ('0.5'),
    or a size ('8GiB', '512MiB', '1e9' bytes; K, M, G, T are powers of 1024)."""
    text = str(spec).strip().lower()
    cuda = device.type == "cuda"
    if text == "auto":
        return int(GPU_KV_FRACTION * _sync_free_gpu(device)) if cuda else CPU_KV_BYTES
    m = re.fullmatch(r"([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?)(?:i?b)?", text)
    value = float(m.group(1)) if m and m.group(1).count(".") <= 1 else -1.0
    if value <= 0:
        raise ValueError(
            f"kv_memory={spec!r} must be 'auto', a fraction of free GPU memory or a size (8GiB)"
        )
    if m.group(2):  # type: ignore[union-attr]
        return int(value * _UNITS[m.group(2)])  # type: ignore[union-attr]
    if value > 1:
        return int(value)
    if not cuda:
        raise ValueError(f"kv_memory={spec!r}: a fraction needs a CUDA device; give a size")
    return int(value * _sync_free_gpu(device))


def _sync_free_gpu(device: torch.device) -> int:
    # NOTE: host sync, once at start-up: the driver's count of free memory
    free, _ = torch.cuda.mem_get_info(device)
    return free


class PagedKVCache:
    """Paged K/V for `n_rows` sequences of at most `max_len` positions (default: the model's
    max_seq_len), in `n_pages` pages."""

    def __init__(
        self,
        model: Transformer,
        n_rows: int,
        n_pages: int,
        page: int,
        cache_pages: int,
        max_len: int | None = None,
    ) -> None:
        cfg = model.cfg
        p = next(model.parameters())
        self.page = page
        self.max_len = max_len or cfg.max_seq_len
        self.row_pages = -(-self.max_len // page)  # M
        if n_pages < self.row_pages + 1:
            raise ValueError(
                f"{n_pages} KV pages cannot hold one sequence of {self.max_len} positions"
                f" ({self.row_pages} pages of {page} + scratch): raise kv_memory or lower"
                " max_model_len"
            )
        shape = (n_pages * page, cfg.kv_heads, cfg.head_dim)  # [P * page, Hkv, Dh]
        # zeros, not empty: masked keys still pass through attention, and NaN * 0 is NaN
        self.keys = [p.new_zeros(shape) for _ in range(cfg.n_layers)]
        self.values = [p.new_zeros(shape) for _ in range(cfg.n_layers)]
        dev = p.device
        self.pad_row = n_rows  # always empty: graph padding points here
        self.block_table = torch.zeros(n_rows + 1, self.row_pages, dtype=torch.long, device=dev)
        self.lengths = torch.zeros(n_rows + 1, dtype=torch.long, device=dev)  # [N + 1]
        self.steps = torch.arange(self.row_pages * page, device=dev)  # [M * page]
        self.pool = PagePool(n_pages, cache_pages)
        self.n_rows = n_rows
        self._reset_rows()

    def _reset_rows(self) -> None:
        self._free_rows = list(range(self.n_rows - 1, -1, -1))
        self._pages: list[list[int]] = [[] for _ in range(self.n_rows)]  # host block tables
        self._len = [0] * self.n_rows  # host lengths
        self._reserved = [0] * self.n_rows  # pages each row may still allocate

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    @property
    def free_rows(self) -> int:
        return len(self._free_rows)

    def length(self, row: int) -> int:
        return self._len[row]

    def pages_for(self, positions: int) -> int:
        return -(-min(positions, self.max_len) // self.page)

    # rows ------------------------------------------------------------------------------
    def can_open(self, pages: int) -> bool:
        """A free row exists and `pages` more can be promised without breaking a promise."""
        return bool(self._free_rows) and self.pool.available - self.pool.reserved >= pages

    def open(self, pages: int) -> int:
        """Take a free row and reserve `pages` for it (check `can_open` first)."""
        row = self._free_rows.pop()
        self._reserved[row] = pages
        self.pool.reserved += pages
        return row

    def reserve(self, row: int, pages: int) -> bool:
        """Raise `row`'s reservation to `pages`; False (nothing changes) when they are not there."""
        more = pages - self._reserved[row]
        if more > 0 and self.pool.available - self.pool.reserved < more:
            return False
        if more > 0:
            self._reserved[row] += more
            self.pool.reserved += more
        return True

    def truncate(self, row: int) -> None:
        """Empty `row` (its pages dropped, length 0), keeping the row and its reservation."""
        for page in self._pages[row]:
            self.pool.drop(page)
        self._pages[row], self._len[row] = [], 0
        self.block_table[row] = SCRATCH
        self.lengths[row] = 0

    def close(self, row: int) -> None:
        """Give `row` back: its pages dropped, its unused reservation returned."""
        self.truncate(row)
        self.pool.reserved -= self._reserved[row]
        self._reserved[row] = 0
        self._free_rows.append(row)

    def reset(self) -> None:
        """Every row closed and every page free (after a failed step left them undefined)."""
        self.pool.clear()
        self._reset_rows()
        self.block_table.zero_()
        self.lengths.zero_()

    def reuse(self, row: int, pages: list[int]) -> None:
        """Start an empty `row` with cached prefix pages (a hit): held, not copied."""
        for page in pages:
            self.pool.hold(page)
        n = len(pages)
        self._pages[row] = list(pages)
        self._len[row] = n * self.page
        if n:
            self.block_table[row, :n] = torch.tensor(pages, device=self.device)
        self.lengths[row] = n * self.page
        released = min(n, self._reserved[row])  # held pages need no new allocation
        self._reserved[row] -= released
        self.pool.reserved -= released

    def extend(self, rows: list[int], new: list[int]) -> None:
        """Allocate pages so each row can store its `new` next positions (one table write)."""
        cells: list[tuple[int, int, int]] = []  # (row, column, page)
        for row, n in zip(rows, new, strict=True):
            pages = self._pages[row]
            for col in range(len(pages), self.pages_for(self._len[row] + n)):
                if self._reserved[row] > 0:
                    self._reserved[row] -= 1
                    self.pool.reserved -= 1
                page = self.pool.alloc()
                pages.append(page)
                cells.append((row, col, page))
        if cells:
            r, c, p = torch.tensor(cells, device=self.device).unbind(1)
            self.block_table[r, c] = p

    def commit(self, rows: list[int], new: list[int]) -> None:
        """The host's lengths after a forward pass stored `new` positions in `rows`."""
        for row, n in zip(rows, new, strict=True):
            self._len[row] += n

    def register(self, row: int, hashes: list[bytes], start: int = 0) -> None:
        """Index the row's full pages from block `start` by the prompt blocks they hold."""
        full = min(len(hashes), self._len[row] // self.page)
        for i in range(start, full):
            self.pool.register(self._pages[row][i], hashes[i])

    # views ------------------------------------------------------------------------------
    def view(self, rows: list[int], new: list[int]) -> RowsView:
        """Eager view: attends to as many pages as the longest row holds after the step."""
        pages = self.pages_for(max(self._len[r] + n for r, n in zip(rows, new, strict=True)))
        dev = self.device
        return RowsView(self, torch.tensor(rows, device=dev), torch.tensor(new, device=dev), pages)

    def static_view(self, rows: Tensor, new: Tensor) -> RowsView:
        """View over device rows [B] and new counts [B] attending to all M pages (capturable)."""
        return RowsView(self, rows, new, self.row_pages)

    def usage(self) -> dict[str, int]:
        return {
            "pages": self.pool.n_pages - 1,
            "page_size": self.page,
            "bytes": sum(t.nbytes for t in (*self.keys, *self.values)),
            "held": self.pool.held,
            "cached": len(self.pool.cached),
            "free": len(self.pool.free),
            "reserved": self.pool.reserved,
        }


class RowsView:
    """Rows `rows` [B] of a PagedKVCache as an `AttentionCache`; row b adds `new[b]` positions."""

    def __init__(self, kv: PagedKVCache, rows: Tensor, new: Tensor, pages: int) -> None:
        self.kv, self.rows, self.new, self.pages = kv, rows, new, pages
        self._plan: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def _prepare(self, S: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Positions, write slots, read slots and mask: once per forward, for every layer."""
        kv, B, page = self.kv, self.rows.shape[0], self.kv.page
        pos = kv.lengths[self.rows][:, None] + kv.steps[:S]  # [B, S]
        valid = kv.steps[:S] < self.new[:, None]  # [B, S] real positions (not padding)
        table = kv.block_table[self.rows]  # [B, M]
        col = torch.div(pos, page, rounding_mode="floor").clamp(max=kv.row_pages - 1)
        write = torch.where(valid, table.gather(1, col) * page + pos % page, SCRATCH)  # [B, S]
        W = self.pages * page
        read = (table[:, : self.pages, None] * page + kv.steps[:page]).reshape(B, W)  # [B, W]
        mask = (kv.steps[:W] <= pos[:, :, None])[:, None]  # [B, 1, S, W]
        self._plan = (pos, write, read, mask)
        return self._plan

    def _plan_for(self, S: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self._plan is None or self._plan[0].shape[1] != S:
            return self._prepare(S)
        return self._plan

    def positions(self, batch: int, new: int, device: torch.device) -> Tensor:
        """[B, S]: each row's new positions follow its own length."""
        return self._plan_for(new)[0]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Store k, v [B, Hkv, S, Dh]; return K, V [B, Hkv, W, Dh] and mask [B, 1, S, W]."""
        _, write, read, mask = self._plan_for(k.shape[2])
        keys, values = self.kv.keys[layer], self.kv.values[layer]  # [P * page, Hkv, Dh]
        keys[write] = k.transpose(1, 2)  # indexed [B, S, Hkv, Dh]
        values[write] = v.transpose(1, 2)
        if layer == self.kv.n_layers - 1:  # every layer has stored this step: the rows grow
            self.kv.lengths.index_add_(0, self.rows, self.new)
        return keys[read].transpose(1, 2), values[read].transpose(1, 2), mask
