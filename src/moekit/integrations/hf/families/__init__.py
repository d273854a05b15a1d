"""The Hugging Face model types moekit converts, one file each, found by `@register_family`.

A family file (`families/<model_type>.py`) defines one `Family` subclass and decorates it with
`@register_family`; every module of this package is imported below, so that file is all a new
family takes. The subclass provides:

- `model_type` and `architecture`: the HF config's `model_type` and the class
  `AutoModelForCausalLM` builds for it;
- `model_config(hf, max_seq_len)`: the moekit `ModelConfig` of an HF config, refusing with
  `self.refuse(...)` every HF option moekit cannot compute exactly, naming the HF field;
- `claims(cfg)` and `check(cfg)`: whether a moekit model's distinctive parts (router kind,
  shared experts, q/k norm) point at this family, and the refusal of what it still cannot hold,
  naming the moekit field;
- `hf_config(cfg)`: the keyword arguments of the family's transformers config class;
- `links(cfg)`: every moekit weight as a `Link` to the HF tensors it is made of, with the
  transform both ways (see links.py); conversion is one loop over these links;
- `expert_weights`: the per-expert gate, up and down names, used also to read transformers 5's
  fused expert tensors as per-expert slices.

The Llama-style families build these from `common` (the config fields they share, what none
of them holds) and `links.decoder`; a family of another shape writes its own.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from typing import Any, ClassVar, NoReturn

from moekit.integrations.hf.links import DENSE_WEIGHTS, Link
from moekit.model.config import ModelConfig


class UnsupportedCheckpoint(ValueError):
    """An HF checkpoint (or a moekit model) that the other side cannot represent exactly."""


class Family(ABC):
    """One HF model type: its config both ways, its weight names, what it refuses."""

    model_type: ClassVar[str]
    architecture: ClassVar[str]  # the class AutoModelForCausalLM builds
    expert_weights: ClassVar[tuple[str, str, str]] = DENSE_WEIGHTS  # per-expert gate, up, down

    @abstractmethod
    def model_config(self, hf: Any, max_seq_len: int | None = None) -> ModelConfig:
        """The moekit config of an HF config object (a transformers PretrainedConfig)."""

    @abstractmethod
    def claims(self, cfg: ModelConfig) -> bool:
        """Whether the model's distinctive parts make this the family to export it as."""

    @abstractmethod
    def check(self, cfg: ModelConfig) -> None:
        """Refuse, by field, what this family cannot hold of a model it claims."""

    @abstractmethod
    def hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
        """Keyword arguments of the family's transformers config class for a moekit model."""

    @abstractmethod
    def links(self, cfg: ModelConfig) -> list[Link]:
        """Every moekit weight of a model with config `cfg`, in checkpoint order."""

    def refuse(self, what: str) -> NoReturn:
        raise UnsupportedCheckpoint(f"{self.model_type}: {what}")


FAMILIES: dict[str, Family] = {}


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: make `cls` the family of its `model_type`."""
    if cls.model_type in FAMILIES:
        raise ValueError(f"family {cls.model_type!r} is registered twice")
    FAMILIES[cls.model_type] = cls()
    return cls


def family_of(model_type: str | None) -> Family:
    """The family of an HF config's model_type; UnsupportedCheckpoint lists the supported ones."""
    if model_type not in FAMILIES:
        raise UnsupportedCheckpoint(
            f"model_type={model_type!r} is not supported; supported: {', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type]


def family_for(cfg: ModelConfig) -> Family:
    """The family a moekit model maps onto exactly; UnsupportedCheckpoint says why none does."""
    refusals = []
    for family in FAMILIES.values():
        if family.claims(cfg):
            try:
                family.check(cfg)
                return family
            except UnsupportedCheckpoint as err:
                refusals.append(err)
    if refusals:
        raise refusals[0]
    parts = f"router.kind={cfg.moe.router.kind!r}, n_shared_experts={cfg.moe.n_shared_experts}"
    raise UnsupportedCheckpoint(
        f"no Hugging Face family ({', '.join(FAMILIES)}) claims {parts}, qk_norm={cfg.qk_norm!r}"
    )


for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
