"""Collectives for expert parallelism: the token-count exchange and an autograd-aware all-to-all.

Shape legend: R ranks in the expert-parallel group, L experts per rank (E = R * L),
N token-slots this rank sends, M token-slots it receives, D model dim.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


def _sync_split_sizes(
    counts_RL: Tensor, group: ProcessGroup | None
) -> tuple[list[int], list[int], Tensor]:
    """Exchange per-expert slot counts; return send sizes, receive sizes and received counts.

    counts_RL[q, l]: slots this rank sends to local expert l of rank q. Returns send_R, recv_R
    (Python ints, the split sizes all_to_all_single needs) and recv_counts_RL[r, l]: slots rank
    r sends to this rank's expert l.
    """
    recv_counts_RL = torch.empty_like(counts_RL)
    dist.all_to_all_single(recv_counts_RL, counts_RL.contiguous(), group=group)
    # NOTE: host sync — payload split sizes must be known on the host before the exchange
    send_R = counts_RL.sum(1).tolist()
    recv_R = recv_counts_RL.sum(1).tolist()
    return send_R, recv_R, recv_counts_RL


def _exchange(x: Tensor, send_R: list[int], recv_R: list[int], group: ProcessGroup | None):
    out = x.new_empty((sum(recv_R), *x.shape[1:]))
    dist.all_to_all_single(
        out, x.contiguous(), output_split_sizes=recv_R, input_split_sizes=send_R, group=group
    )
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 whose backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, send_R: list[int], recv_R: list[int], group) -> Tensor:
        ctx.send_R, ctx.recv_R, ctx.group = send_R, recv_R, group
        return _exchange(x_ND, send_R, recv_R, group)

    @staticmethod
    def backward(ctx, grad_MD: Tensor):
        grad_ND = _exchange(grad_MD, ctx.recv_R, ctx.send_R, ctx.group)
        return grad_ND, None, None, None  # x_ND, send_R, recv_R, group


class _AllToAllStart(torch.autograd.Function):
    """all_to_all_single started without waiting; its backward is the (blocking) reverse."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, send_R: list[int], recv_R: list[int], group, works: list):
        ctx.send_R, ctx.recv_R, ctx.group = send_R, recv_R, group
        out = x_ND.new_empty((sum(recv_R), *x_ND.shape[1:]))
        works.append(
            dist.all_to_all_single(
                out,
                x_ND.contiguous(),
                output_split_sizes=recv_R,
                input_split_sizes=send_R,
                group=group,
                async_op=True,
            )
        )
        return out

    @staticmethod
    def backward(ctx, grad_MD: Tensor):
        grad_ND = _exchange(grad_MD, ctx.recv_R, ctx.send_R, ctx.group)
        return grad_ND, None, None, None, None  # x_ND, send_R, recv_R, group, works


def all_to_all_start(
    x_ND: Tensor, send_R: list[int], recv_R: list[int], group: ProcessGroup | None = None
) -> tuple[Tensor, dist.Work]:
    """`all_to_all` that returns at once: (received [sum(recv_R), ...], work).

    Call `work.wait()` before reading the received rows; compute that needs no rows of it
    runs meanwhile (on CUDA, NCCL's stream overlaps the current one).
    """
    works: list = []
    out = _AllToAllStart.apply(x_ND, send_R, recv_R, group, works)
    return out, works[0]


def all_to_all(
    x_ND: Tensor, send_R: list[int], recv_R: list[int], group: ProcessGroup | None = None
) -> Tensor:
    """Send rows x_ND[sum(send_R[:q]) : ...] to rank q; returns the [sum(recv_R), ...] received.

    Differentiable: the gradient of the received rows travels back the same way. Every rank
    of `group` must call it (and, in backward, run the matching backward) in the same order.
    """
    return _AllToAll.apply(x_ND, send_R, recv_R, group)
