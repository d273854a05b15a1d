"""`SlotCache` and `decode_step`: one forward pass advancing many sequences of different lengths.

Each active sequence owns one row ("slot") of a preallocated per-layer K/V store
[N, Hkv, L, Dh] and its own length. A decode step feeds one new position per sequence: the
dense parts (embedding, projections, norms, MoE experts, head) run on the whole batch, and
attention masks each row to its own length, so sequences never see each other's positions.
Rows 0..n-1 are kept contiguous (a finished sequence's row is filled by the last one), so the
batch view of the store is a slice, not a gather.

Shapes: B active sequences, N slots, L max_seq_len, Hkv kv heads, Dh head size, D model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.layer import MoEInfo
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
        self.lengths = [0] * n_slots  # host copy: positions held by each row
        self.max_len = cfg.max_seq_len

    @property
    def n_slots(self) -> int:
        return len(self.lengths)

    def load(self, row: int, cache: KVCache) -> None:
        """Copy a single-sequence KVCache (B = 1, len <= max_len) into `row`."""
        n = len(cache)
        if n > self.max_len:
            raise ValueError(f"cache of {n} positions does not fit max_len={self.max_len}")
        for i in range(len(self.keys)):
            k, v = cache.layer(i)  # [1, Hkv, n, Dh]
            self.keys[i][row, :, :n] = k[0]
            self.values[i][row, :, :n] = v[0]
        self.lengths[row] = n

    def move(self, src: int, dst: int) -> None:
        """Copy row `src` into row `dst` (compaction after a sequence leaves)."""
        n = self.lengths[src]
        for store in (*self.keys, *self.values):
            store[dst, :, :n] = store[src, :, :n]
        self.lengths[dst] = n

    def to_kv_cache(self, row: int) -> KVCache:
        """A single-sequence KVCache copy of `row` (B = 1)."""
        out = KVCache(len(self.keys))
        n = self.lengths[row]
        for i in range(len(self.keys)):
            out.append(i, self.keys[i][row : row + 1, :, :n], self.values[i][row : row + 1, :, :n])
        return out


def _rotate(x: Tensor, pos: Tensor, inv_freq: Tensor) -> Tensor:
    """RoPE at per-row positions: x [B, H, 1, Dh], pos [B]; same math as `Rotary`."""
    angles = pos.float()[:, None, None, None] * inv_freq  # [B, 1, 1, Dh/2]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


@torch.no_grad()
def decode_step(
    model: Transformer, slots: SlotCache, x: Tensor
) -> tuple[Tensor, list[MoEInfo | None]]:
    """Feed one position to each of the first B rows; x: tokens [B, 1] or vectors [B, 1, d_in].

    Every row must have room (length < max_len). Returns outputs [B, V or d_out] and each
    block's MoEInfo (routing over the B new positions). Row lengths grow by one.
    """
    B = x.shape[0]
    lengths = slots.lengths[:B]
    pos = torch.tensor(lengths, device=slots.keys[0].device)  # [B] position of the new token
    width = max(lengths) + 1
    visible = torch.arange(width, device=pos.device)[None, :] <= pos[:, None]  # [B, width]
    mask = visible[:, None, None, :]  # [B, 1, 1, width]
    rows = torch.arange(B, device=pos.device)
    h = model.embed(x)  # [B, 1, D]
    infos: list[MoEInfo | None] = []
    for i, block in enumerate(model.blocks):
        attn = block.attn
        D, kv_dim = h.shape[-1], attn.n_kv * attn.head_dim
        q, k, v = attn.qkv(block.norm1(h)).split([D, kv_dim, kv_dim], dim=-1)
        q = q.view(B, 1, attn.n_heads, attn.head_dim).transpose(1, 2)  # [B, H, 1, Dh]
        k = k.view(B, 1, attn.n_kv, attn.head_dim).transpose(1, 2)  # [B, Hkv, 1, Dh]
        v = v.view(B, 1, attn.n_kv, attn.head_dim).transpose(1, 2)
        inv_freq = attn.rotary.inv_freq
        q, k = _rotate(q, pos, inv_freq), _rotate(k, pos, inv_freq)
        slots.keys[i][rows, :, pos] = k[:, :, 0]
        slots.values[i][rows, :, pos] = v[:, :, 0]
        y = F.scaled_dot_product_attention(
            q,
            slots.keys[i][:B, :, :width],
            slots.values[i][:B, :, :width],
            attn_mask=mask,
            enable_gqa=attn.n_kv != attn.n_heads,
        )  # [B, H, 1, Dh]
        h = h + attn.proj(y.transpose(1, 2).reshape(B, 1, D))
        f = block.norm2(h)
        info = None
        if block.is_moe:
            f, info = block.ffn(f)
        else:
            f = block.ffn(f)
        infos.append(info)
        h = h + f
    for b in range(B):
        slots.lengths[b] += 1
    return model.head(model.norm(h))[:, -1], infos
