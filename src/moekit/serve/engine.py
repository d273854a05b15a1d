"""`Engine`: dynamic batching of generation requests over one model.

Requests wait in a bounded queue. A background asyncio task runs steps: between two steps it
drops cancelled and timed-out sequences and admits waiting ones, in order, while a row and
the KV pages they may need are free; the step itself (`ModelRunner.step`: one batched decode
forward for every decoding sequence, then the next prompt chunks) runs on a worker thread so
the HTTP event loop stays responsive. Outputs go back to each request as `Event`s on its own
queue. The n choices of one request are n sequences; all but the first wait for its first
output, so they find its prompt in the prefix cache instead of feeding it again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from torch import Tensor

from moekit.model.transformer import Transformer
from moekit.serve.config import EngineConfig
from moekit.serve.runner import ModelRunner, StepResult, batch_invariant
from moekit.serve.sequence import SamplingParams, Sequence
from moekit.serve.stats import ServeStats

log = logging.getLogger(__name__)
T = TypeVar("T")


class QueueFull(Exception):
    """The waiting queue holds `max_queue` requests; retry later."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new requests."""


class Engine:
    """Schedules `Sequence`s onto a `ModelRunner`; create and use inside one event loop."""

    def __init__(self, model: Transformer, cfg: EngineConfig | None = None) -> None:
        self.cfg = cfg or EngineConfig()
        self.model = model.eval()
        self.batch_invariant = batch_invariant(model)
        self.runner = ModelRunner(model, self.cfg, self.batch_invariant)
        kv = self.runner.kv.usage()
        log.info(
            "KV memory: %d pages of %d positions (%.1f MiB) for a context of %d positions",
            kv["pages"],
            kv["page_size"],
            kv["bytes"] / 2**20,
            self.runner.window,
        )
        if self.cfg.max_model_len is None and kv["pages"] * kv["page_size"] < (
            self.runner.kv.n_rows * self.runner.window
        ):  # memory, not the context, limits the batch: a smaller context may serve more
            log.warning(
                "KV memory holds fewer than %d full rows of max_seq_len=%d positions;"
                " give max_model_len (--max-model-len) to size rows for shorter contexts",
                self.runner.kv.n_rows,
                self.runner.window,
            )
        self.stats = ServeStats(
            self.runner.moe_layers, self.runner.n_experts, max_batch=self.runner.kv.n_rows
        )
        # the runner adds to this device tensor each step; only /v1/stats and /metrics read it
        self.stats.expert_tokens = self.runner.expert_tokens
        self.waiting: deque[Sequence] = deque()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one model call at a time (steps and routing jobs)
        self._task: asyncio.Task | None = None
        self._stopping = False

    # lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="moekit-engine")

    async def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the queued and running ones, then end the loop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                self._task.cancel()
                for seq in [*self.waiting, *self.runner.active]:
                    seq.finish("shutdown")

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        return len(self.runner.active)

    @property
    def context_length(self) -> int:
        """Positions one sequence holds (prompt + reply): max_model_len, or max_seq_len."""
        return self.runner.window

    @property
    def prefix_cache(self) -> bool:
        return self.runner.prefix

    def decode_info(self) -> dict[str, object]:
        """How decode steps run: mode, captured bucket sizes, and why graphs are off if asked."""
        d = self.runner.decode
        return {
            "mode": d.mode,
            "graphs": sorted(d.graphs),
            "buckets": list(d.buckets),
            "fallback": d.fallback,
        }

    def info(self) -> dict[str, Any]:
        """How this engine is set up: its config, then what it chose (rows, caches, decode)."""
        return {
            **self.cfg.to_dict(),
            "context_length": self.context_length,
            "batch_invariant": self.batch_invariant,
            "effective_max_batch": self.runner.kv.n_rows,
            "prefix_cache": self.prefix_cache,
            "decode": self.decode_info(),
            "kv": self.runner.kv.usage(),
        }

    def report(self) -> dict[str, Any]:
        """Counts since start: requests, tokens, batches, KV pages, latencies, cache, experts.

        Reads the expert counts back from the device (a host sync); only /v1/stats and
        /metrics call it.
        """
        s = self.stats
        uptime = time.monotonic() - s.started
        kv = self.runner.kv
        return {
            "uptime_s": uptime,
            "requests": {
                "accepted": s.requests,
                "rejected": s.rejected,
                "finished": dict(s.finished),
                "active": self.active,
                "queued": self.queue_depth,
            },
            "queue_depth": self.queue_depth,
            "tokens": {"prompt": s.prompt_tokens, "generated": s.generated_tokens},
            "tokens_per_s": s.tokens_per_s(),
            "tokens_per_s_since_start": s.generated_tokens / max(uptime, 1e-9),
            "batch": {
                "steps": s.steps,
                "mean_size": s.batched_sequences / s.steps if s.steps else 0.0,
                "occupancy": s.occupancy(),
                "prefill_tokens": s.prefill_tokens,
            },
            "kv": kv.usage(),
            "latency_s": s.latency.summary(),
            "ttft_s": s.ttft.summary(),
            "inter_token_s": s.itl.summary(),
            "prefix_cache": self._prefix_report() if self.prefix_cache else None,
            "expert_load": s.expert_load(),
        }

    def _prefix_report(self) -> dict[str, Any]:
        kv = self.runner.kv
        pool, pc = kv.pool, kv.pool.stats
        return {
            "lookups": pc.lookups,
            "hits": pc.hits,
            "hit_rate": pc.hits / pc.lookups if pc.lookups else 0.0,
            "tokens_reused": pc.tokens_reused,
            "token_hit_rate": pc.tokens_reused / pc.tokens_looked_up
            if pc.tokens_looked_up
            else 0.0,
            "blocks": len(pool.index),
            "cached_tokens": len(pool.cached) * kv.page,
            "capacity_tokens": pool.cache_pages * kv.page,
            "evictions": pc.evictions,
        }

    # requests -----------------------------------------------------------------------------
    def submit(
        self,
        prompt: Tensor,
        params: SamplingParams,
        request_id: str | None = None,
        use_cache: bool = True,
    ) -> Sequence:
        """Queue a prompt (tokens [P] or vectors [P, d_in]); raises QueueFull or EngineStopped."""
        return self.submit_n(prompt, params, 1, request_id, use_cache)[0]

    def submit_n(
        self,
        prompt: Tensor,
        params: SamplingParams,
        n: int,
        request_id: str | None = None,
        use_cache: bool = True,
    ) -> list[Sequence]:
        """Queue n continuations of one prompt (choice i samples with seed + i when seeded)."""
        if self._stopping:
            raise EngineStopped("the server is shutting down")
        if len(self.waiting) + n > self.cfg.max_queue:
            self.stats.rejected += 1
            raise QueueFull(f"{len(self.waiting)} requests are waiting")
        base = request_id or uuid.uuid4().hex
        deadline = time.monotonic() + self.cfg.request_timeout_s
        seqs: list[Sequence] = []
        for i in range(n):
            # a fresh seed from the OS: torch.seed() would reseed every device's generator
            # (milliseconds per request) and touch the process's global RNG
            seed = params.seed + i if params.seed is not None else secrets.randbits(63)
            seq = Sequence(
                id=base if n == 1 else f"{base}-{i}",
                prompt=prompt,
                params=params,
                deadline=deadline,
                seed=seed % 2**63,
                use_cache=use_cache,
                after=seqs[0] if seqs else None,
            )
            seqs.append(seq)
        self.waiting.extend(seqs)
        self.stats.requests += 1
        self.stats.prompt_tokens += len(prompt)
        self._wake.set()
        return seqs

    def cancel(self, seq: Sequence) -> None:
        """Stop a request (client gone); its row is freed before the next step."""
        if not seq.done:
            seq.cancelled = True
            self._wake.set()

    async def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run fn on a worker thread between two steps (e.g. a routing inspection)."""
        async with self._lock:
            return await asyncio.to_thread(fn)

    # the loop -----------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            self._retire(time.monotonic())
            if not self.waiting and not self.runner.active:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            self._admit()
            if not self.runner.active:  # everything waiting waits for a first output
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                async with self._lock:
                    result = await asyncio.to_thread(self.runner.step)
            except Exception:  # a bug must not take the server down: fail this batch only
                log.exception("engine step failed")
                for seq in self.runner.active:
                    self._finish(seq, "error")
                self.runner.reset()
                continue
            self._deliver(result)

    def _admit(self) -> None:
        """Admit waiting sequences in order while rows and pages allow (followers when ready)."""
        for seq in list(self.waiting):
            if not seq.ready():
                continue
            if not self.runner.try_admit(seq):
                return
            self.waiting.remove(seq)

    def _deliver(self, result: StepResult) -> None:
        s = self.stats
        s.observe_step(result.decoded, result.prefilled)
        s.add_tokens(len(result.outputs))
        for seq, reason in result.ended:
            self._finish(seq, reason)
        for seq, value, logprobs in result.outputs:
            if seq.done:  # cancelled while the step ran; its row is already free
                continue
            if value in seq.params.stop_token_ids:
                self._finish(seq, "stop")
                continue
            gap = seq.emit(value, logprobs)
            if gap is None:
                s.ttft.observe(seq.t_first - seq.t_submit)  # type: ignore[operator]
            else:
                s.itl.observe(gap)
            if len(seq.outputs) >= seq.params.max_new_tokens:
                self._finish(seq, "length")

    def _retire(self, now: float) -> None:
        """Finish cancelled and timed-out sequences, waiting or running, and free their rows."""
        for seq in list(self.waiting):
            if seq.cancelled or now > seq.deadline:
                self.waiting.remove(seq)
                self._finish(seq, "cancelled" if seq.cancelled else "timeout")
        for seq in list(self.runner.active):
            if seq.cancelled or now > seq.deadline:
                self._finish(seq, "cancelled" if seq.cancelled else "timeout")

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.runner.release(seq)  # safe: called from the loop between steps
        seq.finish(reason)
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        self.stats.latency.observe(seq.t_done - seq.t_submit)  # type: ignore[operator]
