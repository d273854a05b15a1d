"""Choosing the next token from logits: one setting for a batch, or one per row.

`sample_next` serves `generate` (a `torch.Generator` drives `multinomial`). `sample_rows` and
`RowSampling` serve batched decoding where every row is its own request: settings live in
device tensors and the randomness is hashed from (seed, draw, token), so the whole batch
samples in one call on the device and a row's tokens never depend on its neighbours.
`token_logprobs` reads the model's log-probabilities of the drawn tokens and the best others.

Shapes: B rows, V vocabulary, N rows held by `RowSampling`, K top alternatives.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive token ids before hashing


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """logits [B, V] -> next tokens [B]. temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:  # nucleus sampling (Holtzman et al. 2019)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep the first token past p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _mix32(x):
    """Bijective 32-bit integer hash (xor-shift / multiply rounds) of ints or int64 tensors.

    Inputs lie in [0, 2^32) and multipliers below 2^31, so int64 products never overflow.
    """
    x = ((x >> 16) ^ x) * 0x5BD1E995 & _MASK32
    x = ((x >> 15) ^ x) * 0x27D4EB2D & _MASK32
    return (x >> 16) ^ x


def seed_key(seed: int) -> int:
    """A request's seed (any int >= 0) folded to the 32-bit key `sample_rows` hashes."""
    return _mix32(_mix32(seed & _MASK32) ^ ((seed >> 32) & _MASK32))


def _gumbel(keys: Tensor, draws: Tensor, n: int) -> Tensor:
    """[B, n] Gumbel(0, 1) noise, a function of (key, draw, column) only."""
    row = _mix32(keys ^ _mix32(draws & _MASK32))  # [B]
    col = _mix32((torch.arange(n, device=keys.device) + _GOLDEN) & _MASK32)  # [n]
    bits = _mix32(row[:, None] ^ col)  # [B, n]
    u = ((bits >> 8).float() + 0.5) / 2**24  # 24 bits: exact in float32, inside (0, 1)
    return -torch.log(-torch.log(u))


def sample_rows(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    keys: Tensor,
    draws: Tensor,
) -> Tensor:
    """logits [B, V] -> tokens [B], each row with its own settings; no host sync.

    temperature [B] (0 = greedy), top_k [B] (>= V = off), top_p [B] (1 = off), keys [B]
    (`seed_key` of each row's seed), draws [B] (tokens the row drew before). Filters as
    `sample_next` does, then draws by Gumbel-max: argmax(logits / T + g) ~ softmax(logits / T).
    """
    V = logits.shape[-1]
    hot = temperature > 0  # [B]
    scaled = logits.float() / torch.where(hot, temperature, 1.0)[:, None]  # [B, V]
    ranked, order = scaled.sort(dim=-1, descending=True)  # [B, V]
    kth = ranked.gather(-1, (top_k.clamp(1, V) - 1)[:, None])  # [B, 1] k-th largest
    ranked = ranked.masked_fill(ranked < kth, float("-inf"))
    probs = ranked.softmax(-1)
    # nucleus (Holtzman et al. 2019): keep the first token past p, in sorted order
    drop_sorted = (probs.cumsum(-1) - probs >= top_p[:, None]) & (top_p < 1.0)[:, None]
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    scaled = scaled.masked_fill((scaled < kth) | drop, float("-inf"))
    drawn = (scaled + _gumbel(keys, draws, V)).argmax(-1)  # [B]
    return torch.where(hot, drawn, logits.argmax(-1))


def token_logprobs(logits: Tensor, tokens: Tensor, top: int) -> tuple[Tensor, Tensor, Tensor]:
    """logits [B, V], tokens [B] -> logprob of each token [B], top-`top` logprobs and ids [B, K].

    Log-probabilities of the model's own distribution (log_softmax of the raw logits, before
    temperature, top-k or top-p), as OpenAI's API reports them.
    """
    lp = logits.float().log_softmax(-1)  # [B, V]
    chosen = lp.gather(-1, tokens[:, None])[:, 0]  # [B]
    best, ids = lp.topk(min(top, lp.shape[-1]), dim=-1)  # [B, K]
    return chosen, best, ids


class RowSampling:
    """Per-row sampling settings on the device, for `n_rows` rows of a decoding batch.

    A request takes a row with `set` and keeps it until it leaves; `sample` draws for the
    first B rows, `sample_at` for any rows by index, and both count the draw of each.
    """

    def __init__(self, n_rows: int, vocab: int, device: torch.device) -> None:
        self.vocab = vocab
        self.temperature = torch.zeros(n_rows, device=device)  # [N] 0 = greedy
        self.top_k = torch.full((n_rows,), vocab, dtype=torch.long, device=device)  # [N]
        self.top_p = torch.ones(n_rows, device=device)  # [N] 1 = off
        self.keys = torch.zeros(n_rows, dtype=torch.long, device=device)  # [N] seed_key(seed)
        self.draws = torch.zeros(n_rows, dtype=torch.long, device=device)  # [N] tokens drawn
        self._hot = [
            False
        ] * n_rows  # host copy of temperature > 0: all-greedy batches skip sorting

    def _buffers(self) -> tuple[Tensor, ...]:
        return (self.temperature, self.top_k, self.top_p, self.keys, self.draws)

    def set(
        self, row: int, temperature: float, top_k: int | None, top_p: float | None, seed: int
    ) -> None:
        """Give `row` a request's settings and seed; its draws start again at 0."""
        self.temperature[row] = temperature
        self.top_k[row] = self.vocab if top_k is None else min(top_k, self.vocab)
        self.top_p[row] = 1.0 if top_p is None else top_p
        self.keys[row] = seed_key(seed)
        self.draws[row] = 0
        self._hot[row] = temperature > 0

    def move(self, src: int, dst: int) -> None:
        """Copy row `src` into row `dst` (compaction after a request leaves)."""
        for buf in self._buffers():
            buf[dst] = buf[src]
        self._hot[dst] = self._hot[src]

    def hot(self, rows: list[int]) -> bool:
        """Whether any of `rows` samples (temperature > 0); read from the host copy."""
        return any(self._hot[r] for r in rows)

    def sample_at(self, logits: Tensor, rows: Tensor, hot: bool = True) -> Tensor:
        """logits [B, V] of rows `rows` [B] (distinct) -> tokens [B]; counts each row's draw.

        `hot` False (see `hot`) skips the sort: every row is greedy, so draws do not matter.
        """
        if not hot:
            return logits.argmax(-1)
        t, k, p, keys, draws = (buf[rows] for buf in self._buffers())
        tokens = sample_rows(logits, t, k, p, keys, draws)
        self.draws.index_add_(0, rows, torch.ones_like(rows))
        return tokens

    def sample(self, logits: Tensor) -> Tensor:
        """logits [B, V] of rows 0..B-1 -> tokens [B] on the device."""
        B = logits.shape[0]
        if not any(self._hot[:B]):
            return logits.argmax(-1)
        t, k, p, keys, draws = (buf[:B] for buf in self._buffers())
        tokens = sample_rows(logits, t, k, p, keys, draws)
        self.draws[:B] += 1
        return tokens
