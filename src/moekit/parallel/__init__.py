"""Expert parallelism over torch.distributed: the MoE layer with its experts split over ranks."""

from moekit.parallel.comm import all_to_all
from moekit.parallel.expert_parallel import (
    EXPERT_PARALLEL_ATTR,
    AllToAllDispatcher,
    ExpertParallelMoE,
    dense_state_dict,
    gather_experts,
    is_expert_parallel,
    load_dense_state_dict,
    parallelize_experts,
    shard,
    share_router_load,
    split_expert_params,
    to_dense,
)

__all__ = [
    "EXPERT_PARALLEL_ATTR",
    "AllToAllDispatcher",
    "ExpertParallelMoE",
    "all_to_all",
    "dense_state_dict",
    "gather_experts",
    "is_expert_parallel",
    "load_dense_state_dict",
    "parallelize_experts",
    "shard",
    "share_router_load",
    "split_expert_params",
    "to_dense",
]
