"""How a training run spreads over processes, chosen once from `ParallelConfig`.

`SingleProcess` is one process; `ExpertParallel` (`parallel.ep = N`, `parallel.dp = M`, N * M
processes started by torchrun) splits every MoE layer's experts over N ranks, M times over
(ranks d * N ... d * N + N - 1 form expert-parallel group d), hands the replicated parameters
to torch's DDP over all ranks and reduces the experts' gradients itself over the M replicas.
Both answer the same questions for the trainer and the step: which device and rank, which rows
of a batch, how to reduce and clip gradients, whether to stop, what model a checkpoint holds
and what optimizer state it holds (the single-process one, so a run resumes at any size).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.model.store import load_weights
from moekit.parallel import parallelize_experts, share_router_load
from moekit.parallel.checkpoint import (
    full_optimizer_state,
    load_full_optimizer_state,
    load_safetensors,
    to_dense_model,
)
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

    def load_weights(self, model: nn.Module, path: Path, device: torch.device) -> None:
        """Load a checkpoint's (dense) safetensors file into the model this process trains."""
        load_weights(model, path, device)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer state a checkpoint holds: the single-process one (collective)."""
        return optimizer.state_dict()

    def load_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict
    ) -> None:
        """Load a checkpoint's (single-process) optimizer state, this rank's part of it."""
        optimizer.load_state_dict(state)

    def _sync_agree_on_stop(self, seen: int) -> int | None:
        """The stop signal every rank acts on (0 = none seen); here the local one, no sync."""
        return seen or None

    def close(self) -> None:
        """Leave any process group this object created."""


class ExpertParallel(SingleProcess):
    """Experts split over groups of `ep` torchrun ranks, `dp` such groups; the rest under DDP."""

    def __init__(self, ep: int, device: torch.device, dp: int = 1) -> None:
        self._owns_group = False
        world = ep * dp
        if not dist.is_initialized():
            missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
            if missing:
                raise ValueError(
                    f"parallel.ep={ep} needs one process per rank: launch with "
                    f"`torchrun --nproc-per-node {world} -m moekit.cli train CONFIG "
                    f"--parallel.ep {ep}{f' --parallel.dp {dp}' if dp > 1 else ''}` "
                    f"({', '.join(missing)} not set)"
                )
            if int(os.environ["WORLD_SIZE"]) != world:
                raise ValueError(_world_mismatch(ep, dp, int(os.environ["WORLD_SIZE"])))
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self._owns_group = True
        if dist.get_world_size() != world:
            raise ValueError(_world_mismatch(ep, dp, dist.get_world_size()))
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        super().__init__(device)
        self.world, self.rank, self.ep, self.dp = world, dist.get_rank(), ep, dp
        self.is_main = self.rank == 0
        # the experts' all-to-all uses its group (the default one when dp = 1); DDP gets its own
        self._dp_group = dist.new_group(list(range(world)))
        self._ep_group, self._replica_group = None, None
        if dp > 1:  # every rank makes every group, in the same order
            ep_groups = [dist.new_group(list(range(d * ep, (d + 1) * ep))) for d in range(dp)]
            replicas = [dist.new_group(list(range(e, world, ep))) for e in range(ep)]
            self._ep_group = ep_groups[self.rank // ep]
            self._replica_group = replicas[self.rank % ep]
        self._ddp: nn.Module | None = None

    def shard(self, model: nn.Module) -> nn.Module:
        model = parallelize_experts(model, self._ep_group)
        return share_router_load(model, None)  # every rank holds a replica of each router

    def wrap(self, model: nn.Module) -> nn.Module:
        self._ddp = data_parallel(model, self._dp_group)
        return self._ddp

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Accumulating micro-batches: DDP all-reduces after the last one only."""
        if last or self._ddp is None:
            return contextlib.nullcontext()
        return self._ddp.no_sync()  # type: ignore[operator]

    def reduce_gradients_(self, model: nn.Module) -> None:
        # DDP averaged the rest; experts: summed over their replicas, then / world
        reduce_expert_gradients_(model, self._replica_group, world_size=self.world)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        # the whole model's norm, experts included (each expert counted once)
        return clip_grad_norm_(model, max_norm, self._ep_group)

    def dense(self, model: nn.Module) -> nn.Module:
        return to_dense_model(model)

    def load_weights(self, model: nn.Module, path: Path, device: torch.device) -> None:
        load_safetensors(model, path)  # each rank reads its own experts' rows

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return full_optimizer_state(model, optimizer)

    def load_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict
    ) -> None:
        load_full_optimizer_state(model, optimizer, state)

    def _sync_agree_on_stop(self, seen: int) -> int | None:
        """Any rank's signal stops every rank (a collective). NOTE: host sync."""
        flag = torch.tensor([seen], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False


def _world_mismatch(ep: int, dp: int, world: int) -> str:
    return f"parallel.ep={ep} x parallel.dp={dp} must equal the number of processes ({world})"


def build_parallelism(cfg: ParallelConfig, device: torch.device) -> SingleProcess:
    """The run's parallelism: expert (and data) parallel over torchrun ranks when ep * dp > 1."""
    if cfg.ep * cfg.dp > 1:
        return ExpertParallel(cfg.ep, device, cfg.dp)
    return SingleProcess(device)
