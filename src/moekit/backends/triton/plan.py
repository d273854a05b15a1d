"""The dropless `Plan` as a counting sort in two launches, instead of argsorts and scatters.

Launch 1 counts, per program, how many of its slots go to each bucket (E experts plus one for
empty slots). Launch 2 has every program rebuild the [E + 1] totals and the counts of the
programs before it from that small table, so each slot's sorted position is
start[bucket] + slots of its bucket in earlier programs + its rank within its own program:
stable by flat slot id, exactly the order of `torch.argsort(bucket, stable=True)`. Program 0
also writes counts_E and offsets_E1. Integer work only, no host sync.

Shape legend: T tokens, K slots per token, S = T * K slots, E experts, B = E + 1 buckets
(padded to BLOCK_B), P programs, each walking `chunks` runs of BLOCK_S consecutive slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moekit.backends.triton.ops import triton_op
from moekit.types import Plan

MAX_PROGRAMS = 64  # each program of launch 2 reads the whole [P, B] table: keep P small


@triton.jit
def _buckets(experts_ptr, s, mask, E):
    """Bucket of each slot: its expert, or E for an empty slot (expert -1)."""
    x = tl.load(experts_ptr + s, mask=mask, other=-1)
    return tl.where((x >= 0) & (x < E), x, E).to(tl.int32)


@triton.jit
def _count_kernel(
    experts_ptr,  # [S] expert of each flat slot, -1 when empty
    table_ptr,  # [P, BLOCK_B] int32 out: slots per bucket of each program
    S,
    E,
    chunks,
    BLOCK_S: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.arange(0, BLOCK_B)
    acc = tl.zeros([BLOCK_B], dtype=tl.int32)
    for c in range(0, chunks):
        s = (pid * chunks + c) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = s < S
        bucket = _buckets(experts_ptr, s, mask, E)
        hit = (bucket[:, None] == b[None, :]) & mask[:, None]  # [BLOCK_S, BLOCK_B]
        acc += tl.sum(hit.to(tl.int32), 0)
    tl.store(table_ptr + pid * BLOCK_B + b, acc)


@triton.jit
def _scatter_kernel(
    experts_ptr,  # [S] expert of each flat slot, -1 when empty
    table_ptr,  # [P, BLOCK_B] int32 from _count_kernel
    order_ptr,  # [S] int64 out: flat slot id of each sorted position
    token_ptr,  # [S] int64 out: its token (slot // K)
    expert_ptr,  # [S] out, experts' dtype: its bucket (E for empty slots)
    counts_ptr,  # [E] int64 out
    offsets_ptr,  # [E + 1] int64 out
    S,
    E,
    K,
    chunks,
    n_programs,
    BLOCK_S: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.arange(0, BLOCK_B)
    total = tl.zeros([BLOCK_B], dtype=tl.int32)
    before = tl.zeros([BLOCK_B], dtype=tl.int32)  # slots of each bucket in earlier programs
    for q in range(0, n_programs):  # one [B] row at a time: the table never sits in registers
        row = tl.load(table_ptr + q * BLOCK_B + b)
        total += row
        before += tl.where(q < pid, row, 0)
    start = tl.cumsum(total, 0) - total  # first sorted position of each bucket
    if pid == 0:
        tl.store(counts_ptr + b, total.to(tl.int64), mask=b < E)
        tl.store(offsets_ptr + b, start.to(tl.int64), mask=b <= E)
    running = start + before
    for c in range(0, chunks):
        s = (pid * chunks + c) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = s < S
        bucket = _buckets(experts_ptr, s, mask, E)
        hit = ((bucket[:, None] == b[None, :]) & mask[:, None]).to(tl.int32)
        rank = tl.sum(tl.where(hit > 0, tl.cumsum(hit, 0) + running[None, :], 0), 1) - 1
        tl.store(order_ptr + rank, s.to(tl.int64), mask=mask)
        tl.store(token_ptr + rank, (s // K).to(tl.int64), mask=mask)
        tl.store(expert_ptr + rank, bucket.to(expert_ptr.dtype.element_ty), mask=mask)
        running += tl.sum(hit, 0)


def _grid(n_slots: int, n_buckets: int) -> tuple[int, int, int, int]:
    """(BLOCK_S, BLOCK_B, chunks per program, programs) for S slots over B buckets."""
    block_b = triton.next_power_of_2(max(n_buckets, 2))
    block_s = max(16, min(128, 8192 // block_b))  # [BLOCK_S, BLOCK_B] compare per chunk
    n_chunks = triton.cdiv(n_slots, block_s)
    chunks = triton.cdiv(n_chunks, MAX_PROGRAMS)
    return block_s, block_b, chunks, triton.cdiv(n_chunks, chunks)


@triton_op("moekit_triton::counting_sort")
def counting_sort(
    experts_TK: Tensor, n_experts: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(order_S, token_S, expert_S, counts_E, offsets_E1) of the dropless plan; see module doc."""
    T, K = experts_TK.shape
    S, E, device = T * K, n_experts, experts_TK.device
    order_S = torch.empty(S, dtype=torch.long, device=device)
    token_S = torch.empty(S, dtype=torch.long, device=device)
    expert_S = torch.empty(S, dtype=experts_TK.dtype, device=device)
    if S == 0:
        counts_E = torch.zeros(E, dtype=torch.long, device=device)
        offsets_E1 = torch.zeros(E + 1, dtype=torch.long, device=device)
        return order_S, token_S, expert_S, counts_E, offsets_E1
    # the scatter's program 0 writes every entry of these two
    counts_E = torch.empty(E, dtype=torch.long, device=device)
    offsets_E1 = torch.empty(E + 1, dtype=torch.long, device=device)
    flat_S = experts_TK.reshape(-1).contiguous()
    block_s, block_b, chunks, n_programs = _grid(S, E + 1)
    table = torch.empty(n_programs, block_b, dtype=torch.int32, device=device)
    _count_kernel[(n_programs,)](flat_S, table, S, E, chunks, BLOCK_S=block_s, BLOCK_B=block_b)
    _scatter_kernel[(n_programs,)](
        flat_S,
        table,
        order_S,
        token_S,
        expert_S,
        counts_E,
        offsets_E1,
        S,
        E,
        K,
        chunks,
        n_programs,
        BLOCK_S=block_s,
        BLOCK_B=block_b,
    )
    return order_S, token_S, expert_S, counts_E, offsets_E1


@counting_sort.register_fake
def _(experts_TK: Tensor, n_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    S = experts_TK.shape[0] * experts_TK.shape[1]
    order_S = experts_TK.new_empty(S, dtype=torch.long)
    counts_E = experts_TK.new_empty(n_experts, dtype=torch.long)
    offsets_E1 = experts_TK.new_empty(n_experts + 1, dtype=torch.long)
    return order_S, torch.empty_like(order_S), experts_TK.new_empty(S), counts_E, offsets_E1


def make_plan_dropless(experts_TK: Tensor, weights_TK: Tensor, n_experts: int) -> Plan:
    """`dispatch.make_plan` without a capacity, equal field by field, from `counting_sort`.

    The weights stay torch ops on the sorted ids, so gradients reach the router as before.
    """
    order_S, token_S, expert_S, counts_E, offsets_E1 = counting_sort(experts_TK, n_experts)
    kept_TK = (experts_TK >= 0) & (experts_TK < n_experts)
    used_TK = weights_TK * kept_TK
    token_S = token_S if experts_TK.shape[1] else order_S
    return Plan.from_sort(order_S, token_S, expert_S, counts_E, offsets_E1, kept_TK, used_TK, None)
