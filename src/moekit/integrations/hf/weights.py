"""Hugging Face checkpoint files: safetensors, one file or shards behind an index.

`HFWeights` reads tensors by name from `model.safetensors` or from the shards listed in
`model.safetensors.index.json`; `write_hf_weights` writes them back the same way, sharded
above a size. Only safetensors are read: pickled `pytorch_model.bin` files can run code.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class HFWeights:
    """Lazy name -> tensor access over the safetensors files of one checkpoint directory."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        if (directory / INDEX).exists():
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        elif (directory / SINGLE).exists():
            weight_map = None
        else:
            found = sorted(p.name for p in directory.glob("*.bin")) if directory.is_dir() else []
            extra = f" (found {', '.join(found)}: convert them to safetensors)" if found else ""
            raise FileNotFoundError(f"{directory}: no {SINGLE} or {INDEX}{extra}")
        self._stack = ExitStack()
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        handles = {f: self._stack.enter_context(safe_open(directory / f, "pt")) for f in files}
        if weight_map is None:
            weight_map = dict.fromkeys(handles[SINGLE].keys(), SINGLE)
        self._where = {name: handles[f] for name, f in weight_map.items()}

    def names(self) -> set[str]:
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"weight {name!r} is not in the checkpoint")
        return self._where[name].get_tensor(name)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> HFWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_hf_weights(
    tensors: dict[str, torch.Tensor], directory: str | Path, max_shard_bytes: int
) -> list[Path]:
    """Write tensors as `model.safetensors`, or as shards plus an index when they exceed a shard."""
    directory = Path(directory)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    meta = {"format": "pt"}  # transformers reads safetensors only with this metadata
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE, metadata=meta)
        return [directory / SINGLE]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / name, metadata=meta)
        weight_map.update(dict.fromkeys(shard, name))
        paths.append(directory / name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*paths, directory / INDEX]
