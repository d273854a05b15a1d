"""OpenAI's frequency / presence penalties and logit biases, per row of a decoding batch.

A row's generated tokens are counted on the device, c [V]; before sampling its logits become
logits - c * frequency_penalty - (c > 0) * presence_penalty + bias. The counts and biases
are allocated at the first request that uses them; a batch where no row uses any skips the
whole step (a host-side flag per row), so requests without them pay nothing.

Shapes: N rows held, n rows of one step, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LogitAdjust:
    """Per-row penalties and biases on the device, for `n_rows` rows over a vocabulary `vocab`."""

    def __init__(self, n_rows: int, vocab: int, device: torch.device) -> None:
        self.n_rows, self.vocab, self.device = n_rows, vocab, device
        self.frequency = torch.zeros(n_rows, device=device)  # [N]
        self.presence = torch.zeros(n_rows, device=device)  # [N]
        self.counts: Tensor | None = None  # [N, V] int32 tokens each row generated
        self.bias: Tensor | None = None  # [N, V] float32 added to each row's logits
        self._on = [False] * n_rows  # host copy: the row adjusts its logits

    def set(
        self, row: int, frequency: float, presence: float, bias: tuple[tuple[int, float], ...]
    ) -> None:
        """Give `row` a request's penalties and biases; its counts start again at 0."""
        self.frequency[row] = frequency
        self.presence[row] = presence
        penalised = bool(frequency or presence)
        if penalised and self.counts is None:
            self.counts = torch.zeros(
                self.n_rows, self.vocab, dtype=torch.int32, device=self.device
            )
        if self.counts is not None:
            self.counts[row] = 0
        if bias and self.bias is None:
            self.bias = torch.zeros(self.n_rows, self.vocab, device=self.device)
        if self.bias is not None:
            self.bias[row] = 0.0
            if bias:
                ids = torch.tensor([t for t, _ in bias], dtype=torch.long)
                values = torch.tensor([b for _, b in bias], dtype=torch.float32)
                self.bias[row, ids.to(self.device)] = values.to(self.device)
        self._on[row] = penalised or bool(bias)

    def active(self, rows: list[int]) -> bool:
        """Whether any of `rows` adjusts its logits; read from the host copy."""
        return any(self._on[r] for r in rows)

    def apply(self, logits: Tensor, rows: Tensor) -> Tensor:
        """logits [n, V] of rows `rows` [n] -> adjusted float32 logits [n, V]; no host sync.

        A row without penalties or biases gets its logits back unchanged (x - 0 + 0 == x).
        """
        out = logits.float()
        if self.counts is not None:
            c = self.counts[rows].float()  # [n, V]
            out = out - c * self.frequency[rows, None] - (c > 0) * self.presence[rows, None]
        if self.bias is not None:
            out = out + self.bias[rows]
        return out

    def count(self, rows: Tensor, tokens: Tensor) -> None:
        """Add each row's new token [n] to its counts (rows distinct)."""
        if self.counts is not None:
            self.counts[rows, tokens] += 1
