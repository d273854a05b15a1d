"""`ModelRunner`: the engine's compute, run on its worker thread one step at a time.

A step (1) releases the rows of sequences that left, (2) advances every decoding sequence by
one position in a single batched forward pass (`decode_step`), (3) prefills the newly admitted
ones, reusing a cached prompt prefix where one matches, and samples their first output.

Shapes: B decoding sequences, P prompt positions, V vocabulary, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.layer import MoEInfo
from moekit.model.generate import sample_next
from moekit.model.transformer import Transformer
from moekit.serve.prefix_cache import PrefixCache
from moekit.serve.sequence import Sequence
from moekit.serve.slots import SlotCache, decode_step

BATCH_DEPENDENT_ROUTERS = ("expert_choice", "sinkhorn")


def batch_invariant(model: Transformer) -> bool:
    """True when each position's output is independent of the others in its forward pass.

    Capacity limits and batch-balancing routers make routing depend on the other tokens, so
    batching or prefix reuse would change results; the engine then decodes one at a time.
    """
    for block in model.blocks:
        if block.is_moe:
            cfg = block.ffn.cfg
            if cfg.capacity_factor is not None or cfg.router.kind in BATCH_DEPENDENT_ROUTERS:
                return False
    return True


@dataclass
class StepResult:
    """Outputs of one step: (sequence, output) pairs and expert counts [n MoE layers, E]."""

    outputs: list[tuple[Sequence, object]]
    expert_tokens: Tensor
    decoded: int  # sequences advanced by the batched decode


class ModelRunner:
    """Owns the model, the slot cache and the prefix cache; not thread-safe (one step at a time)."""

    def __init__(self, model: Transformer, max_batch: int, prefix: PrefixCache | None) -> None:
        self.model = model.eval()
        self.slots = SlotCache(model, max_batch)
        self.prefix = prefix
        self.active: list[Sequence] = []  # active[i].row == i
        self.window = model.cfg.max_seq_len
        self.moe_layers = model.moe_layers()
        blocks = [model.blocks[i] for i in self.moe_layers]
        self.n_experts = blocks[0].ffn.cfg.n_experts if blocks else 0

    @property
    def free_rows(self) -> int:
        return self.slots.n_slots - len(self.active)

    def release(self, seq: Sequence) -> None:
        """Give back a sequence's row, moving the last active row into it."""
        if seq.row is None:
            return
        r, last = seq.row, self.active.pop()
        if last is not seq:
            self.slots.move(last.row, r)  # type: ignore[arg-type]
            self.active[r], last.row = last, r
        seq.row = None

    @torch.no_grad()
    def step(self, admitted: list[Sequence]) -> StepResult:
        counts = torch.zeros(len(self.moe_layers), max(self.n_experts, 1), dtype=torch.long)
        outputs: list[tuple[Sequence, object]] = []
        decoding = list(self.active)
        for seq in decoding:  # the window is full: restart from its last half, as `generate` does
            if self.slots.lengths[seq.row] + 1 > self.window:  # type: ignore[index]
                self._refill(seq)
        if decoding:
            x = torch.stack([s.pending for s in decoding])[:, None]  # [B, 1] or [B, 1, d_in]
            out, infos = decode_step(self.model, self.slots, x.to(self._device))
            self._count(infos, counts)
            outputs += self._sample(decoding, out)
        for seq in admitted:
            out = self._prefill(seq, counts)
            outputs += self._sample([seq], out)
        return StepResult(outputs, counts, len(decoding))

    @property
    def _device(self) -> torch.device:
        return self.slots.keys[0].device

    def _prefill(self, seq: Sequence, counts: Tensor) -> Tensor:
        """Run the prompt's last window (after any cached prefix); returns outputs [1, V]."""
        feed = seq.prompt[-self.window :]
        seq.history = seq.prompt
        hit = None
        if self.prefix is not None and not feed.is_floating_point():
            hit = self.prefix.lookup(feed, limit=len(feed) - 1)
        cache = hit.cache if hit is not None else self.model.new_cache()
        seq.prefix_hit = hit.length if hit is not None else 0
        x = feed[seq.prefix_hit :][None].to(self._device)  # [1, P'] or [1, P', d_in]
        result = self.model(x, cache=cache)
        self._count(result.layers, counts)
        if self.prefix is not None and not feed.is_floating_point():
            self.prefix.insert(feed, cache)
        seq.row = len(self.active)
        self.active.append(seq)
        self.slots.load(seq.row, cache)
        return result.out[:, -1]

    def _refill(self, seq: Sequence) -> None:
        """Rebuild a full row from the last window // 2 positions before the pending one."""
        assert seq.history is not None
        keep = seq.history[-(self.window // 2 + 1) : -1][None].to(self._device)
        cache = self.model.new_cache()
        self.model(keep, cache=cache)
        self.slots.load(seq.row, cache)  # type: ignore[arg-type]

    def _sample(self, seqs: list[Sequence], out: Tensor) -> list[tuple[Sequence, object]]:
        """Pick each sequence's next output from out [B, V] (or take the vector [B, d_out])."""
        results: list[tuple[Sequence, object]] = []
        if not self.model.is_lm:
            nxt = out.float().cpu()
            for b, seq in enumerate(seqs):
                self._feed(seq, nxt[b])
                results.append((seq, nxt[b]))
            return results
        greedy = out.argmax(-1).cpu()  # [B]
        for b, seq in enumerate(seqs):
            p = seq.params
            if p.temperature == 0:
                token = greedy[b]
            else:
                token = sample_next(
                    out[b : b + 1].float().cpu(), p.temperature, p.top_k, p.top_p, seq.generator
                )[0]
            self._feed(seq, token)
            results.append((seq, int(token)))
        return results

    def _feed(self, seq: Sequence, value: Tensor) -> None:
        seq.pending = value.to(seq.prompt.dtype)
        assert seq.history is not None
        seq.history = torch.cat([seq.history, seq.pending[None]])[-self.window :]

    def _count(self, infos: list[MoEInfo | None], counts: Tensor) -> None:
        """Add each MoE layer's routed token-slots (dropped = -1 left out) to counts [L, E]."""
        moe = [info for info in infos if info is not None]
        for i, info in enumerate(moe):
            experts = info.routing.experts.flatten()
            kept = experts[experts >= 0].cpu()
            counts[i] += torch.bincount(kept, minlength=counts.shape[1])[: counts.shape[1]]
