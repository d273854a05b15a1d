"""Expert parallelism over torch.distributed: the MoE layer with its experts split over ranks."""

from moekit.parallel.comm import all_to_all
from moekit.parallel.expert_parallel import (
    EXPERT_PARALLEL_ATTR,
    ExpertParallelMoE,
    gather_experts,
    parallelize_experts,
    share_router_load,
    split_expert_params,
)

__all__ = [
    "EXPERT_PARALLEL_ATTR",
    "ExpertParallelMoE",
    "all_to_all",
    "gather_experts",
    "parallelize_experts",
    "share_router_load",
    "split_expert_params",
]
