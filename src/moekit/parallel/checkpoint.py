"""Checkpoints of models holding `ExpertParallelMoE` layers, in the single-process format.

Expert tensors are gathered into the dense layout on save and sliced per rank on load, so a
checkpoint written with one expert-parallel size loads with any other, or with no parallelism
at all (`moekit.MoE` / `moekit.load`). Optimizer states go the same way: expert moments are
gathered into the single-process state dict and cut per rank on load, so a training run resumes
at any expert-parallel size. Every function here is collective: call it on all ranks.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.model.store import CONFIG_FILE, WEIGHTS_FILE
from moekit.parallel.expert_parallel import ExpertParallelMoE, gather_experts, to_dense


def _expert_layers(model: nn.Module) -> dict[str, ExpertParallelMoE]:
    """State-dict prefix ("blocks.1.ffn." ...) -> expert-parallel layer, for every such layer."""
    return {
        (f"{name}." if name else ""): m
        for name, m in model.named_modules()
        if isinstance(m, ExpertParallelMoE)
    }


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict the model would have without expert parallelism (experts gathered)."""
    state = model.state_dict()
    for prefix, layer in _expert_layers(model).items():
        for name, p in layer.experts.named_parameters():
            state[f"{prefix}experts.{name}"] = gather_experts(p.detach(), layer.dispatcher.group)
    return state


def shard_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A dense state dict cut to this rank's experts for every expert-parallel layer."""
    ranges = {
        f"{prefix}experts.": (
            layer.dispatcher.first_expert,
            layer.dispatcher.first_expert + layer.dispatcher.n_local,
        )
        for prefix, layer in _expert_layers(model).items()
    }
    out = {}
    for key, value in state_dict.items():
        hit = next((r for p, r in ranges.items() if key.startswith(p)), None)
        out[key] = value[hit[0] : hit[1]] if hit else value
    return out


def load_full_state_dict(model: nn.Module, state_dict: dict[str, Tensor], strict: bool = True):
    """Load a dense state dict (e.g. from a single-process model) into a sharded model."""
    return model.load_state_dict(shard_state_dict(model, state_dict), strict=strict)


def to_dense_model(model: nn.Module) -> nn.Module:
    """A copy of `model` with every `ExpertParallelMoE` replaced by its dense `moekit.MoE`."""
    memo = {id(layer): to_dense(layer) for layer in _expert_layers(model).values()}
    return copy.deepcopy(model, memo)


def _tied_aliases(model: nn.Module) -> set[str]:
    """State-dict keys naming a tensor already named earlier (tied weights)."""
    seen, aliases = set(), set()
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            aliases.add(key)
        seen.add(id(t))
    return aliases


def save_safetensors(model: nn.Module, path: str | Path) -> None:
    """Write the dense state dict to one safetensors file from global rank 0 (atomic rename)."""
    state = full_state_dict(model)
    if dist.get_rank() == 0:
        aliases = _tied_aliases(model)
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items() if k not in aliases}
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    dist.barrier()


def load_safetensors(model: nn.Module, path: str | Path) -> None:
    """Load a dense safetensors file, each rank reading only its own experts' rows."""
    prefixes = {
        f"{prefix}experts.": (
            layer.dispatcher.first_expert,
            layer.dispatcher.first_expert + layer.dispatcher.n_local,
        )
        for prefix, layer in _expert_layers(model).items()
    }
    device = next(model.parameters()).device
    state = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            hit = next((r for p, r in prefixes.items() if key.startswith(p)), None)
            state[key] = f.get_slice(key)[hit[0] : hit[1]] if hit else f.get_tensor(key)
    missing, unexpected = model.load_state_dict(
        {k: v.to(device) for k, v in state.items()}, strict=False
    )
    missing = set(missing) - _tied_aliases(model)
    if missing or unexpected:
        raise ValueError(f"{path}: missing {sorted(missing)}, unexpected {sorted(unexpected)}")


def save_layer(layer: ExpertParallelMoE, directory: str | Path) -> None:
    """config.json + model.safetensors for one layer, loadable by `load_layer` or as a MoE."""
    directory = Path(directory)
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(layer.cfg.to_dict(), indent=2) + "\n")
    dist.barrier()
    save_safetensors(layer, directory / WEIGHTS_FILE)


def load_layer(directory: str | Path, group=None, device: str | torch.device = "cpu"):
    """An `ExpertParallelMoE` over `group` from a `save_layer` directory, any group size."""
    directory = Path(directory)
    cfg = MoEConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    with torch.device(device), torch.random.fork_rng(devices=[]):
        layer = ExpertParallelMoE(cfg, group)  # a throwaway initialisation, then the file
    load_safetensors(layer, directory / WEIGHTS_FILE)
    return layer


def _expert_ranges(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, tuple]:
    """Optimizer state index -> (layer, L) for every sharded expert parameter it updates."""
    owner = {
        id(p): layer for layer in _expert_layers(model).values() for p in layer.experts.parameters()
    }
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {i: owner[id(p)] for i, p in enumerate(params) if id(p) in owner}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state dict a single process would hold: expert moments gathered.

    Per-expert tensors ([L, ...], e.g. AdamW's exp_avg) become [E, ...] in global expert
    order; scalars (step) and replicated parameters' state are kept as they are. Collective.
    """
    state = optimizer.state_dict()
    state["state"] = dict(state["state"])  # its per-parameter dicts are the optimizer's own
    for i, layer in _expert_ranges(model, optimizer).items():
        if i not in state["state"]:
            continue
        slots = dict(state["state"][i])
        for key, value in slots.items():
            if (
                isinstance(value, Tensor)
                and value.dim() > 0
                and value.shape[0] == layer.dispatcher.n_local
            ):
                slots[key] = gather_experts(value, layer.dispatcher.group)
        state["state"][i] = slots
    return state


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a single-process optimizer state dict, each rank keeping its experts' rows."""
    state = {**state, "state": dict(state["state"])}
    for i, layer in _expert_ranges(model, optimizer).items():
        lo = layer.dispatcher.first_expert
        hi = lo + layer.dispatcher.n_local
        slots = dict(state["state"].get(i, {}))
        for key, value in slots.items():
            if isinstance(value, Tensor) and value.dim() > 0:
                if value.shape[0] != layer.cfg.n_experts:
                    raise ValueError(
                        f"optimizer state {i}.{key}: {value.shape[0]} rows, expected one per "
                        f"expert ({layer.cfg.n_experts})"
                    )
                slots[key] = value[lo:hi]
        if slots:
            state["state"][i] = slots
    optimizer.load_state_dict(state)
