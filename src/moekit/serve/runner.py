"""`ModelRunner`: the engine's compute, run on its worker thread one step at a time.

A step (1) advances every decoding sequence by one position in a single batched forward pass
(`model(x, cache=slots)`), (2) prefills the newly admitted ones, reusing a cached prompt prefix
where one matches, and (3) picks every sequence's next output in one batched call on the
device. The step's only host sync reads those outputs back (`_sync_outputs`); expert counts
stay on the device and the next inputs are fed from a device buffer.

Shapes: B decoding sequences, A admitted ones, N rows, P prompt positions, V vocabulary,
L MoE layers, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.layer import MoE, MoEInfo
from moekit.model.sampling import RowSampling
from moekit.model.transformer import Transformer
from moekit.serve.prefix_cache import PrefixCache
from moekit.serve.sequence import Sequence
from moekit.serve.slots import SlotCache

BATCH_DEPENDENT_ROUTERS = ("expert_choice", "sinkhorn")  # for routers without the attribute


def _layer_batch_invariant(moe: MoE) -> bool:
    """The router's class says whether a token's routing ignores the other tokens."""
    router = type(moe.router)
    drops = moe.cfg.capacity_factor is not None and getattr(router, "uses_capacity", True)
    default = moe.cfg.router.kind not in BATCH_DEPENDENT_ROUTERS
    return not drops and bool(getattr(router, "batch_invariant", default))


def batch_invariant(model: Transformer) -> bool:
    """True when each position's output is independent of the others in its forward pass.

    Capacity limits and batch-balancing routers make routing depend on the other tokens, so
    batching or prefix reuse would change results; the engine then decodes one at a time.
    """
    return all(_layer_batch_invariant(b.ffn) for b in model.blocks if b.is_moe)


def _sync_outputs(values: Tensor) -> list:
    """One step's outputs on the host: token ids [n] -> ints, vectors [n, d] -> CPU rows."""
    # NOTE: host sync, the step's only one: the outputs go back to the clients
    if values.is_floating_point():
        return list(values.cpu())
    return values.tolist()


@dataclass
class StepResult:
    """Outputs of one step: (sequence, output) pairs, in decode-then-admission order."""

    outputs: list[tuple[Sequence, object]]
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
        dev = self.slots.device
        # [L, E] token-slots routed since start; read only by /v1/stats and /metrics
        self.expert_tokens = torch.zeros(
            len(self.moe_layers), self.n_experts, dtype=torch.long, device=dev
        )
        cfg = model.cfg
        if model.is_lm:
            self.inputs = torch.zeros(max_batch, 1, dtype=torch.long, device=dev)  # [N, 1]
            self.sampling = RowSampling(max_batch, cfg.vocab_size, dev)  # type: ignore[arg-type]
        else:
            self.inputs = torch.zeros(max_batch, 1, cfg.d_in, device=dev)  # type: ignore[arg-type]

    @property
    def free_rows(self) -> int:
        return self.slots.n_slots - len(self.active)

    def release(self, seq: Sequence) -> None:
        """Give back a sequence's row, moving the last active row into it."""
        if seq.row is None:
            return
        r, last = seq.row, self.active.pop()
        if last is not seq:
            src = last.row
            self.slots.move(src, r)  # type: ignore[arg-type]
            self.inputs[r] = self.inputs[src]
            if self.model.is_lm:
                self.sampling.move(src, r)  # type: ignore[arg-type]
            self.active[r], last.row = last, r
        seq.row = None

    @torch.no_grad()
    def step(self, admitted: list[Sequence]) -> StepResult:
        outs: list[Tensor] = []  # [B or 1, V or d_out] each
        decoding = list(self.active)
        for seq in decoding:  # the window is full: restart from its last half, as `generate` does
            if self.slots.length(seq.row) + 1 > self.window:  # type: ignore[arg-type]
                self._refill(seq)
        if decoding:
            result = self.model(self.inputs[: len(decoding)], cache=self.slots)
            self._count(result.layers)
            outs.append(result.out[:, -1])
        outs += [self._prefill(seq) for seq in admitted]
        seqs = decoding + admitted  # seqs[i].row == i
        outputs = self._next(seqs, torch.cat(outs)) if seqs else []
        return StepResult(outputs, len(decoding))

    def _prefill(self, seq: Sequence) -> Tensor:
        """Run the prompt's last window (after any cached prefix); returns outputs [1, V]."""
        feed = seq.prompt[-self.window :]
        seq.history = seq.prompt
        hit = None
        if self.prefix is not None and not feed.is_floating_point():
            hit = self.prefix.lookup(feed, limit=len(feed) - 1)
        cache = hit.cache if hit is not None else self.model.new_cache()
        seq.prefix_hit = hit.length if hit is not None else 0
        x = feed[seq.prefix_hit :][None].to(self.slots.device)  # [1, P'] or [1, P', d_in]
        result = self.model(x, cache=cache)
        self._count(result.layers)
        if self.prefix is not None and not feed.is_floating_point():
            self.prefix.insert(feed, cache)
        seq.row = len(self.active)
        self.active.append(seq)
        self.slots.load(seq.row, cache)
        if self.model.is_lm:
            p = seq.params
            seed = seq.generator.initial_seed()
            self.sampling.set(seq.row, p.temperature, p.top_k, p.top_p, seed)
        return result.out[:, -1]

    def _refill(self, seq: Sequence) -> None:
        """Rebuild a full row from the last window // 2 positions before the pending one."""
        assert seq.history is not None
        keep = seq.history[-(self.window // 2 + 1) : -1][None].to(self.slots.device)
        cache = self.model.new_cache()
        self.model(keep, cache=cache)
        self.slots.load(seq.row, cache)  # type: ignore[arg-type]

    def _next(self, seqs: list[Sequence], out: Tensor) -> list[tuple[Sequence, object]]:
        """Pick rows 0..n-1's next outputs from out [n, V] (or take the vectors [n, d_out])."""
        n = len(seqs)
        if self.model.is_lm:
            values = self.sampling.sample(out)  # [n]
            self.inputs[:n, 0] = values
        else:
            values = out.float()  # [n, d_out]
            self.inputs[:n, 0] = values.to(self.inputs.dtype)
        results: list[tuple[Sequence, object]] = []
        for seq, value in zip(seqs, _sync_outputs(values), strict=True):
            seq.pending = torch.as_tensor(value, dtype=seq.prompt.dtype)
            assert seq.history is not None
            seq.history = torch.cat([seq.history, seq.pending[None]])[-self.window :]
            results.append((seq, value))
        return results

    def _count(self, infos: list[MoEInfo | None]) -> None:
        """Add each MoE layer's routed token-slots (dropped = -1 left out) on the device."""
        moe = [info for info in infos if info is not None]
        for counts_E, info in zip(self.expert_tokens, moe, strict=True):
            experts = info.routing.experts.flatten()  # [T * K], -1 = dropped
            counts_E.scatter_add_(0, experts.clamp(min=0), (experts >= 0).long())
