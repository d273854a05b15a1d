"""`ModelRunner`: the engine's compute, run on its worker thread one step at a time.

A step (1) advances every decoding sequence by one position in one batched forward pass
(`DecodeStep`: a CUDA graph replay on the GPU), (2) feeds the next chunks of admitted
prompts, several sequences per forward pass padded to a common length and at most
`prefill_chunk` prompt positions per step, so a long prompt never stalls the decodes, and
(3) picks the next output of every sequence that got one, in one batched call on the device
(per-row penalties and logit biases, temperature, top-k, top-p and seed; log-probabilities,
of the unadjusted logits, when asked). The step's only
host sync reads those outputs back (`_sync_outputs`); expert counts stay on the device.

K/V live in a `PagedKVCache`. Admission reserves every page a sequence may need, so none
runs out mid-way, and starts the prompt from cached pages of its leading full blocks.

Shapes: B decoding sequences, G sequences in a prefill group, C chunk positions, n outputs
of a step, V vocabulary (or d_out), K top log-probabilities, L MoE layers, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from moekit.model.sampling import RowSampling, token_logprobs
from moekit.model.transformer import Transformer
from moekit.serve.config import EngineConfig
from moekit.serve.graphs import DecodeStep, count_routed
from moekit.serve.paged import PagedKVCache, kv_budget, page_bytes
from moekit.serve.pages import block_hashes
from moekit.serve.penalties import LogitAdjust
from moekit.serve.sequence import Logprobs, Sequence

PAD_WASTE = 0.25  # a prefill group pads at most this fraction of its real positions


def batch_invariant(model: Transformer) -> bool:
    """True when each position's output is independent of the others in its forward pass.

    Capacity limits and batch-balancing routers make routing depend on the other tokens, so
    batching, padding, chunking or prefix reuse would change results; the engine then runs
    one sequence at a time and feeds each prompt whole.
    """
    return all(b.ffn.batch_invariant for b in model.blocks if b.is_moe)


def _sync_outputs(values: Tensor) -> list:
    """One step's outputs on the host: token ids [n] -> ints, vectors [n, d] -> CPU rows."""
    # NOTE: host sync, the step's only one: the outputs go back to the clients
    if values.is_floating_point():
        return list(values.cpu())
    return values.tolist()


def _sync_packed(packed: Tensor) -> list[list[float]]:
    """Token ids with their log-probabilities, packed [n, 2 + 2K] float64 -> rows of floats."""
    # NOTE: host sync, the step's only one when a request asked for log-probabilities
    return packed.tolist()


def prefill_groups(work: list[tuple[Sequence, int]]) -> list[list[tuple[Sequence, int]]]:
    """Split (sequence, chunk length) pairs into padded forward passes wasting <= PAD_WASTE."""
    groups: list[list[tuple[Sequence, int]]] = []
    for item in sorted(work, key=lambda w: -w[1]):
        group = groups[-1] if groups else None
        if group is not None:
            width, real = group[0][1], sum(n for _, n in group) + item[1]
            if width * (len(group) + 1) <= (1 + PAD_WASTE) * real:
                group.append(item)
                continue
        groups.append([item])
    return groups


@dataclass
class StepResult:
    """One step: (sequence, output, logprobs) in decode-then-prefill order, and early ends."""

    outputs: list[tuple[Sequence, object, Logprobs | None]]
    decoded: int  # sequences advanced by the batched decode
    prefilled: int = 0  # prompt positions fed
    ended: list[tuple[Sequence, str]] = field(default_factory=list)  # stopped by the runner


class ModelRunner:
    """Owns the model, the paged KV memory and the rows; not thread-safe (one step at a time)."""

    def __init__(self, model: Transformer, cfg: EngineConfig, exact: bool = True) -> None:
        self.model = model.eval()
        self.cfg = cfg
        self.exact = exact  # batch-invariant model: batching, padding and prefix reuse allowed
        self.window = cfg.context_length(model.cfg.max_seq_len)  # positions a row holds
        max_batch = cfg.max_batch if exact else 1
        p = next(model.parameters())
        dev = p.device
        self.kv = PagedKVCache(
            model,
            max_batch,
            self._n_pages(max_batch, dev),
            cfg.page_size,
            cfg.prefix_cache_tokens // cfg.page_size if exact else 0,
            self.window,
        )
        self.prefix = exact and cfg.prefix_cache_tokens > 0
        self.chunk = cfg.prefill_chunk if exact else None  # None: a prompt in one pass
        self.decoding: list[Sequence] = []
        self.prefilling: list[Sequence] = []  # admitted; prompt not fully fed yet
        self.moe_layers = model.moe_layers()
        blocks = [model.blocks[i] for i in self.moe_layers]
        self.n_experts = blocks[0].ffn.cfg.n_experts if blocks else 0
        # [L, E] token-slots routed since start; read only by /v1/stats and /metrics
        self.expert_tokens = torch.zeros(
            len(self.moe_layers), self.n_experts, dtype=torch.long, device=dev
        )
        mc, N = model.cfg, max_batch + 1  # + the pad row
        if model.is_lm:
            self.inputs = torch.zeros(N, 1, dtype=torch.long, device=dev)  # [N, 1]
            self.sampling = RowSampling(N, mc.vocab_size, dev)  # type: ignore[arg-type]
            self.adjust = LogitAdjust(N, mc.vocab_size, dev)  # type: ignore[arg-type]
        else:
            self.inputs = torch.zeros(N, 1, mc.d_in, dtype=p.dtype, device=dev)  # type: ignore[arg-type]
        # the rows a step samples for, staged in pinned host memory: no per-step tensor, no sync
        self._rows_host = torch.zeros(N, dtype=torch.long, pin_memory=dev.type == "cuda")  # [N]
        self._rows = torch.zeros(N, dtype=torch.long, device=dev)  # [N]
        mode = cfg.decode_mode
        if mode == "auto":
            mode = "graphs" if dev.type == "cuda" else "eager"
        self.decode = DecodeStep(model, self.kv, self.inputs, self.expert_tokens, max_batch, mode)

    def _n_pages(self, rows: int, device: torch.device) -> int:
        """Pages that fit --kv-memory, capped at what full rows and the prefix cache can use."""
        page = self.cfg.page_size
        useful = rows * -(-self.window // page) + self.cfg.prefix_cache_tokens // page + 1
        return min(useful, kv_budget(self.cfg.kv_memory, device) // page_bytes(self.model, page))

    @property
    def active(self) -> list[Sequence]:
        return self.decoding + self.prefilling

    @property
    def free_rows(self) -> int:
        return self.kv.free_rows

    # admission ----------------------------------------------------------------------------
    def try_admit(self, seq: Sequence) -> bool:
        """Give `seq` a row, its pages' reservation and any cached prefix; False: no room now."""
        feed = seq.prompt[-self.window :]
        need = self.kv.pages_for(len(feed) + seq.params.max_new_tokens)
        if not self.kv.can_open(need):
            return False
        row = self.kv.open(need)
        seq.row, seq.feed, seq.fed = row, feed, 0
        if self.prefix and seq.use_cache:
            self._reuse_prefix(seq)
        if self.model.is_lm:
            p = seq.params
            self.sampling.set(row, p.temperature, p.top_k, p.top_p, seq.seed)
            self.adjust.set(row, p.frequency_penalty, p.presence_penalty, p.logit_bias)
        if len(feed) - seq.fed == 1:  # all but the last position cached: a decode step feeds it
            self.inputs[row, 0] = feed[-1].to(self.inputs.dtype)
            seq.fed = len(feed)
            self.decoding.append(seq)
        else:
            self.prefilling.append(seq)
        return True

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Start from cached pages of the prompt's leading blocks (the last position is fed)."""
        assert seq.feed is not None and seq.row is not None
        page, stats = self.kv.page, self.kv.pool.stats
        seq.hashes = block_hashes(seq.feed, page)
        pages = self.kv.pool.match(seq.hashes[: (len(seq.feed) - 1) // page])
        if len(pages) * page < self.cfg.min_prefix:
            pages = []
        self.kv.reuse(seq.row, pages)
        seq.fed = seq.prefix_hit = len(pages) * page
        stats.lookups += 1
        stats.tokens_looked_up += len(seq.feed)
        stats.hits += bool(pages)
        stats.tokens_reused += seq.fed

    def release(self, seq: Sequence) -> None:
        """Give back a sequence's row and pages (finished, cancelled or failed)."""
        if seq.row is None:
            return
        for group in (self.decoding, self.prefilling):
            if seq in group:
                group.remove(seq)
        self.kv.close(seq.row)
        seq.row = None

    def reset(self) -> None:
        """Forget every row and page after a failed step (their contents are undefined)."""
        for seq in self.active:
            seq.row = None
        self.decoding, self.prefilling = [], []
        self.kv.reset()

    # the step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> StepResult:
        ended = self._refill()
        outs: list[Tensor] = []  # [B or F, V or d_out] each
        seqs = list(self.decoding)
        if seqs:
            rows = [s.row for s in seqs]
            self.kv.extend(rows, [1] * len(rows))  # type: ignore[list-item]
            outs.append(self.decode(rows))  # type: ignore[arg-type]
            self.kv.commit(rows, [1] * len(rows))  # type: ignore[list-item]
        done, fed = self._prefill(outs)
        logits = outs[0] if len(outs) == 1 else torch.cat(outs) if outs else None
        outputs = self._next(seqs + done, logits) if logits is not None else []
        self.decoding += done
        return StepResult(outputs, len(seqs), fed, ended)

    def _prefill(self, outs: list[Tensor]) -> tuple[list[Sequence], int]:
        """Feed this step's prompt chunks; appends the outputs of finished prompts to outs."""
        budget = self.chunk
        work: list[tuple[Sequence, int]] = []
        for seq in self.prefilling:
            left = len(seq.feed) - seq.fed  # type: ignore[arg-type]
            n = left if budget is None else min(left, budget)
            if n <= 0:
                break
            work.append((seq, n))
            if budget is not None:
                budget -= n
        done: list[Sequence] = []
        groups = prefill_groups(work) if self.exact else [[w] for w in work]
        for group in groups:
            out = self._feed(group)  # [G, C, V]
            for i, (seq, n) in enumerate(group):
                if seq.fed == len(seq.feed):  # type: ignore[arg-type]
                    done.append(seq)
                    outs.append(out[i, n - 1][None])
        for seq in done:
            self.prefilling.remove(seq)
        return done, sum(n for _, n in work)

    def _feed(self, group: list[tuple[Sequence, int]]) -> Tensor:
        """One forward pass over the next chunk of each sequence, padded to the longest."""
        rows = [seq.row for seq, _ in group]
        counts = [n for _, n in group]
        chunks = [seq.feed[seq.fed : seq.fed + n] for seq, n in group]  # type: ignore[index]
        x = self._padded(chunks)
        self.kv.extend(rows, counts)  # type: ignore[arg-type]
        out = self._forward(rows, counts, x)  # type: ignore[arg-type]
        for seq, n in group:
            start = seq.fed // self.kv.page
            seq.fed += n
            if seq.hashes:
                self.kv.register(seq.row, seq.hashes, start)  # type: ignore[arg-type]
        return out

    def _padded(self, chunks: list[Tensor]) -> Tensor:
        """Host chunks [C_i] or [C_i, d_in] -> one device batch [G, C] or [G, C, d_in]."""
        C = max(len(c) for c in chunks)
        x = chunks[0].new_zeros(len(chunks), C, *chunks[0].shape[1:])
        for i, c in enumerate(chunks):
            x[i, : len(c)] = c
        dtype = None if x.dtype == torch.long else self.inputs.dtype
        return x.to(self.kv.device, dtype)

    def _forward(self, rows: list[int], counts: list[int], x: Tensor) -> Tensor:
        """Store `counts` positions of x [G, C(, d)] in `rows`; outputs [G, C, V]."""
        view = self.kv.view(rows, counts)
        out = self.model(x, cache=view)
        valid = self.kv.steps[: x.shape[1]] < view.new[:, None]  # [G, C]
        count_routed(self.expert_tokens, out.layers, valid.flatten())
        self.kv.commit(rows, counts)
        return out.out

    def _device_rows(self, rows: list[int]) -> Tensor:
        """rows [n] on the device, copied from pinned memory without waiting for the device.

        Safe to reuse the staging buffer: every step ends by reading its outputs back.
        """
        n = len(rows)
        self._rows_host.numpy()[:n] = rows
        return self._rows[:n].copy_(self._rows_host[:n], non_blocking=True)

    def _refill(self) -> list[tuple[Sequence, str]]:
        """Rows whose window is full restart from their last window // 2 positions, as
        `generate` does; a row that cannot get the pages for it ends early ('length')."""
        ended = []
        for seq in list(self.decoding):
            row = seq.row
            if self.kv.length(row) + 1 <= self.window:  # type: ignore[arg-type]
                continue
            keep = seq.history()[-(self.window // 2 + 1) : -1]
            self.kv.truncate(row)  # type: ignore[arg-type]
            left = seq.params.max_new_tokens - len(seq.outputs)
            if not self.kv.reserve(row, self.kv.pages_for(len(keep) + left)):  # type: ignore[arg-type]
                self.release(seq)
                ended.append((seq, "length"))
                continue
            self.kv.extend([row], [len(keep)])  # type: ignore[list-item]
            self._forward([row], [len(keep)], self._padded([keep]))  # type: ignore[list-item]
        return ended

    def _next(
        self, seqs: list[Sequence], out: Tensor
    ) -> list[tuple[Sequence, object, Logprobs | None]]:
        """Pick each sequence's next output from out [n, V] (or take the vectors [n, d_out])."""
        rows = self._device_rows([s.row for s in seqs])  # type: ignore[misc]
        asked = [s.logprobs for s in seqs if s.logprobs is not None]
        if not self.model.is_lm:
            values = out.float()  # [n, d_out]
            if values.shape[-1] == self.inputs.shape[-1]:  # d_out == d_in: it rolls out
                self.inputs[rows, 0] = values.to(self.inputs.dtype)
            return [(s, v, None) for s, v in zip(seqs, _sync_outputs(values), strict=True)]
        host_rows: list[int] = [s.row for s in seqs]  # type: ignore[misc]
        hot = self.sampling.hot(host_rows)
        adjusted = self.adjust.active(host_rows)
        scores = self.adjust.apply(out, rows) if adjusted else out  # [n, V]
        tokens = self.sampling.sample_at(scores, rows, hot)  # [n]
        if adjusted:
            self.adjust.count(rows, tokens)
        self.inputs[rows, 0] = tokens
        if not asked:
            return [(s, t, None) for s, t in zip(seqs, _sync_outputs(tokens), strict=True)]
        chosen, best, ids = token_logprobs(out, tokens, max(max(asked), 1))
        parts = (tokens[:, None], chosen[:, None], ids, best)  # ids < 2^53: exact in float64
        packed = torch.cat([t.double() for t in parts], 1)  # [n, 2 + 2K]
        results: list[tuple[Sequence, object, Logprobs | None]] = []
        for seq, row in zip(seqs, _sync_packed(packed), strict=True):
            lp = None
            if seq.logprobs is not None:
                K = (len(row) - 2) // 2
                top = [(int(i), v) for i, v in zip(row[2 : 2 + K], row[2 + K :], strict=True)]
                lp = Logprobs(row[1], top[: seq.logprobs])
            results.append((seq, int(row[0]), lp))
        return results
