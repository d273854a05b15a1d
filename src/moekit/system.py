"""`System`: one object that wraps a small MoE network with its training step and memory.

It composes pieces that exist on their own (`MoE` layers, `KnowledgeStore`,
`KnowledgeRecorder`) and adds three switches, each a plain PyTorch feature:
``compile`` (`torch.compile` of the wrapped model), ``amp_dtype`` (`torch.autocast`) and
``checkpointing`` (non-reentrant `torch.utils.checkpoint` around each MoE block). Checkpointing
re-runs each block's forward in backward, so layer buffers updated in forward (co-activation
counts, the sigmoid router's bias) are updated twice per training step. The training step is
the library's `moekit.train.step.TrainStep`.
Shape legend: B batch, S sequence, T tokens, D model dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moekit.config import MoEConfig
from moekit.layer import MoE, MoEInfo
from moekit.memory import Hit, KnowledgeRecorder, KnowledgeStore
from moekit.train.step import Precision, StepConfig, StepLoss, TrainStep


@dataclass
class SystemConfig:
    """A stack of residual MoE blocks between an input and an output projection."""

    moe: MoEConfig = field(default_factory=MoEConfig)
    d_in: int | None = None  # None: moe.d_model
    d_out: int | None = None  # None: moe.d_model
    n_layers: int = 2
    compile: bool = False  # torch.compile the wrapped model
    compile_mode: str | None = None  # torch.compile mode, e.g. "reduce-overhead"
    compile_backend: str = "inductor"
    amp_dtype: str | None = None  # "bfloat16" | "float16" (or bf16 | fp16): autocast the forward
    checkpointing: bool = False  # recompute each MoE block in backward instead of storing it
    knowledge_path: str | None = None  # SQLite file of a KnowledgeStore; None = no memory
    knowledge_every: int = 100  # record on training steps 1, every + 1, 2 * every + 1, ...
    knowledge_layer: int = -1  # which MoE layer's input hidden states and experts to record
    knowledge_dedup: float = 0.85  # KnowledgeStore.dedup_threshold

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        for name in ("d_in", "d_out"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be an integer >= 1 or None")
        if not isinstance(self.n_layers, int) or self.n_layers < 1:
            raise ValueError(f"n_layers={self.n_layers!r} must be an integer >= 1")
        Precision.parse(self.amp_dtype, "amp_dtype")  # a ValueError naming amp_dtype
        if self.knowledge_every < 1:
            raise ValueError(f"knowledge_every={self.knowledge_every} must be >= 1")
        if not -self.n_layers <= self.knowledge_layer < self.n_layers:
            raise ValueError(
                f"knowledge_layer={self.knowledge_layer} is not a layer of n_layers={self.n_layers}"
            )

    @property
    def precision(self) -> Precision:
        """amp_dtype in the training step's vocabulary (None = fp32)."""
        return Precision.parse(self.amp_dtype, "amp_dtype")


@dataclass
class SystemOutput:
    """y [..., d_out]; aux_loss summed over layers; per-layer infos and input hidden states."""

    y: Tensor
    aux_loss: Tensor
    infos: list[MoEInfo]
    hiddens: list[Tensor]  # [..., D] residual stream entering each MoE layer (detached)


class MoENetwork(nn.Module):
    """x [..., d_in] -> Linear -> n_layers x (h + MoE(LayerNorm(h))) -> Linear -> [..., d_out]."""

    def __init__(self, cfg: SystemConfig) -> None:
        super().__init__()
        D = cfg.moe.d_model
        self.checkpointing = cfg.checkpointing
        self.embed = nn.Linear(cfg.d_in or D, D)
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(cfg.n_layers))
        self.layers = nn.ModuleList(MoE(cfg.moe) for _ in range(cfg.n_layers))
        self.head = nn.Linear(D, cfg.d_out or D)

    def block(self, i: int, h: Tensor) -> tuple[Tensor, MoEInfo]:
        y, info = self.layers[i](self.norms[i](h))
        return h + y, info

    def forward(self, x: Tensor) -> SystemOutput:
        h = self.embed(x)
        infos, hiddens = [], []
        for i in range(len(self.layers)):
            hiddens.append(h.detach())
            if self.checkpointing and self.training and torch.is_grad_enabled():
                h, info = checkpoint(self.block, i, h, use_reentrant=False)
            else:
                h, info = self.block(i, h)
            infos.append(info)
        aux = torch.stack([info.aux_loss.float() for info in infos]).sum()
        return SystemOutput(self.head(h), aux, infos, hiddens)


def _as_output(out: Any, x: Tensor) -> SystemOutput:
    """Accept a bare `moekit.MoE` as the wrapped model: (y, info) -> SystemOutput."""
    if isinstance(out, SystemOutput):
        return out
    y, info = out
    return SystemOutput(y, info.aux_loss, [info], [x.detach()])


class System(nn.Module):
    """A model with training step, compile / AMP / checkpointing switches and a knowledge store.

    >>> system = System(SystemConfig(moe=MoEConfig(d_model=64), knowledge_path="kg.db"))
    >>> stats = system.training_step((x, target), optimizer, nn.MSELoss())
    >>> hits = system.query_knowledge_graph(query_64, top_k=5)
    """

    def __init__(self, cfg: SystemConfig, model: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model if model is not None else MoENetwork(cfg)
        compiled = (
            torch.compile(self.model, mode=cfg.compile_mode, backend=cfg.compile_backend)
            if cfg.compile
            else self.model
        )
        # kept out of the module tree: registering it would list every parameter twice
        self.__dict__["forward_fn"] = compiled
        self.steps = 0
        self.store: KnowledgeStore | None = None
        self.recorder: KnowledgeRecorder | None = None
        if cfg.knowledge_path is not None:
            self.store = KnowledgeStore(
                cfg.knowledge_path, dim=cfg.moe.d_model, dedup_threshold=cfg.knowledge_dedup
            )
            self.recorder = KnowledgeRecorder(self.store, every=cfg.knowledge_every)
        self._step: TrainStep | None = None  # built on the first step, where the device is known

    def forward(self, x: Tensor) -> SystemOutput:
        dtype = self.cfg.precision.dtype
        with torch.autocast(
            x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None
        ):
            return _as_output(self.forward_fn(x), x)

    def training_step(self, batch: tuple[Tensor, Tensor], optimizer: Any, loss_fn: Any) -> dict:
        """One optimiser step on (x, target); loss = loss_fn(y, target) + the MoE aux losses.

        Returns tensors (no host sync): loss, task_loss, aux_loss and "metrics", the layers'
        metrics keyed "layer{i}/{name}". Records knowledge on the recorder's sampled steps.
        """
        if self._step is None:  # float16 gradients underflow without the step's scaler
            self._step = TrainStep(self, StepConfig(precision=self.cfg.precision))
        outputs: list[SystemOutput] = []

        def loss(out: SystemOutput, batch: tuple[Tensor, Tensor]) -> StepLoss:
            outputs.append(out)
            task = loss_fn(out.y.float(), batch[1])  # float32 whatever the autocast dtype
            metrics = {
                f"layer{i}/{name}": value
                for i, info in enumerate(out.infos)
                for name, value in info.metrics.items()
            }
            return StepLoss(task, out.aux_loss.float(), metrics={"metrics": metrics})

        record = self._step(optimizer, [batch], lambda b: self(b[0]), loss)
        self.steps += 1
        self.record_knowledge(outputs[0])
        return record

    def record_knowledge(self, out: SystemOutput) -> list[int]:
        """Step hook: on sampled calls, store each sequence's pooled hidden state and experts.

        The recorded layer is `knowledge_layer`; hidden states [B, S, D] pool per sequence,
        [T, D] into one insight. NOTE: host sync on sampled steps (the store lives on the host).
        """
        if self.recorder is None:
            return []
        i = self.cfg.knowledge_layer % len(out.infos)
        hidden = out.hiddens[i]
        if hidden.dim() > 3:
            hidden = hidden.reshape(-1, hidden.shape[-2], hidden.shape[-1])
        return self.recorder(hidden, out.infos[i].routing.experts, layer=i, step=self.steps)

    def query_knowledge_graph(self, query: Tensor, top_k: int = 5) -> list[Hit]:
        """The `top_k` stored insights most cosine-similar to `query` [D], best first."""
        if self.store is None:
            raise ValueError("no knowledge store: set SystemConfig.knowledge_path")
        return self.store.query(query, top_k)

    def close(self) -> None:
        """Close the knowledge store's database (the model stays usable)."""
        if self.store is not None:
            self.store.close()
