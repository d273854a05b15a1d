"""How a training run spreads over processes, chosen once from `ParallelConfig`.

`SingleProcess` is one process; `ExpertParallel` (`parallel.ep = N`, one process per rank,
started by torchrun) splits every MoE layer's experts over the N ranks, hands the replicated
parameters to torch's DDP and averages the experts' gradients itself. Both answer the same
questions for the trainer and the step: which device and rank, which rows of a batch, how to
reduce and clip gradients, whether to stop, and what model a checkpoint holds.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.parallel import parallelize_experts
from moekit.parallel.checkpoint import to_dense_model
from moekit.parallel.data_parallel import clip_grad_norm_, data_parallel, reduce_expert_gradients_
from moekit.train.config import ParallelConfig
from moekit.train.step import LocalGradients

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def resolve_device(name: str) -> torch.device:
    """`train.device`, where 'auto' is CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class SingleProcess(LocalGradients):
    """One process: rank 0 of 1, local gradients, the model as it is."""

    world, rank, is_main = 1, 0, True
    resumable = True  # the optimizer state is whole, so a checkpoint can be resumed

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def shard(self, model: nn.Module) -> nn.Module:
        """The model this process trains (built identically on every rank)."""
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        """What the training forward runs through (after the optimizer is built)."""
        return model

    def local_rows(self, per_rank: int) -> slice:
        """This rank's rows of a step's global batch of `world * per_rank` rows."""
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def dense(self, model: nn.Module) -> nn.Module:
        """The whole model, as a checkpoint or a plot needs it (collective when sharded)."""
        return model

    def _sync_agree_on_stop(self, seen: int) -> int | None:
        """The stop signal every rank acts on (0 = none seen); here the local one, no sync."""
        return seen or None

    def close(self) -> None:
        """Leave any process group this object created."""


class ExpertParallel(SingleProcess):
    """Experts split over the torchrun ranks; the rest replicated under DDP on its own group."""

    resumable = False  # each rank holds its experts' optimizer moments, which are not saved

    def __init__(self, ep: int, device: torch.device) -> None:
        self._owns_group = False
        if not dist.is_initialized():
            missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
            if missing:
                raise ValueError(
                    f"parallel.ep={ep} needs one process per rank: launch with "
                    f"`torchrun --nproc-per-node {ep} -m moekit.cli train CONFIG --parallel.ep "
                    f"{ep}` ({', '.join(missing)} not set)"
                )
            world = int(os.environ["WORLD_SIZE"])
            if world != ep:
                raise ValueError(f"parallel.ep={ep} must equal the number of processes ({world})")
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self._owns_group = True
        if dist.get_world_size() != ep:
            raise ValueError(
                f"parallel.ep={ep} must equal the number of processes ({dist.get_world_size()})"
            )
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        super().__init__(device)
        self.world, self.rank = ep, dist.get_rank()
        self.is_main = self.rank == 0
        # the experts' all-to-all uses the default group; DDP's all-reduce gets its own
        self._dp_group = dist.new_group(list(range(ep)))
        self._ddp: nn.Module | None = None

    def shard(self, model: nn.Module) -> nn.Module:
        return parallelize_experts(model, None)

    def wrap(self, model: nn.Module) -> nn.Module:
        self._ddp = data_parallel(model, self._dp_group)
        return self._ddp

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Accumulating micro-batches: DDP all-reduces after the last one only."""
        if last or self._ddp is None:
            return contextlib.nullcontext()
        return self._ddp.no_sync()  # type: ignore[operator]

    def reduce_gradients_(self, model: nn.Module) -> None:
        reduce_expert_gradients_(model, world_size=self.world)  # DDP averaged the rest

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        return clip_grad_norm_(model, max_norm)  # the whole model's norm, experts included

    def dense(self, model: nn.Module) -> nn.Module:
        return to_dense_model(model)

    def _sync_agree_on_stop(self, seen: int) -> int | None:
        """Any rank's signal stops every rank (a collective). NOTE: host sync."""
        flag = torch.tensor([seen], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False


def build_parallelism(cfg: ParallelConfig, device: torch.device) -> SingleProcess:
    """The run's parallelism: expert parallel over torchrun ranks when cfg.ep > 1."""
    return ExpertParallel(cfg.ep, device) if cfg.ep > 1 else SingleProcess(device)
