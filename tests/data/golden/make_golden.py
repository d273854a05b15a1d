"""Write the golden files that `tests/test_golden.py` compares against, bit for bit.

Run once against a tree known to be right; every later change must reproduce these bits on
CPU in float32. Writes a tiny checkpoint (`model/`), MoE layers for every router
(`layers.json`, `layers.safetensors`) and what they compute (`*_expected.safetensors`).

    python tests/data/golden/make_golden.py --out tests/data/golden
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

import moekit
from moekit.train.step import optimizer_step_hooks

SEED = 1234
# one thread: a CPU reduction split over threads may round differently
THREADS = 1
MODEL = {
    "vocab_size": 16,
    "d_model": 8,
    "n_layers": 2,
    "n_heads": 2,
    "n_kv_heads": 1,
    "max_seq_len": 16,
    "d_ff": 16,
    "moe": {"d_model": 8, "d_hidden": 8, "n_experts": 4, "k": 2, "backend": "torch"},
}
BATCH, SEQ = 2, 6
# layer cases: MoEConfig overrides on LAYER_BASE (widths a multiple of 4: grouped_mm on CPU
# needs 16-byte strides); capacity, shared experts and the dense
# fallback each appear in at least one case
LAYER_BASE = {"d_model": 8, "d_hidden": 8, "n_experts": 4, "k": 2}
LAYER_CASES: dict[str, dict] = {
    "topk": {
        "capacity_factor": 0.5,
        "n_shared_experts": 1,
        "fallback": "dense",
        "router": {"kind": "topk", "load_balance_weight": 0.1, "z_loss_weight": 0.01},
        "expert": {"activation": "swiglu", "bias": True},
    },
    "sigmoid": {
        "capacity_factor": 1.25,
        "router": {
            "kind": "sigmoid",
            "n_groups": 2,
            "topk_groups": 1,
            "options": {"bias_update_rate": 0.01},
        },
        "expert": {"activation": "gelu"},
    },
    "expert_choice": {
        "router": {"kind": "expert_choice", "load_balance_weight": 0.1},
        "expert": {"activation": "reglu", "bias": True},
    },
    "sinkhorn": {
        "capacity_factor": 1.0,
        "router": {"kind": "sinkhorn", "options": {"iters": 10}},
        "expert": {"activation": "silu"},
    },
    "attention": {
        "n_shared_experts": 1,
        "router": {"kind": "attention", "options": {"heads": 2, "dim": 4}},
        "expert": {"activation": "geglu", "bias": True},
    },
}
LAYER_LEAD = (3, 5)  # x [3, 5, D]: T = 15 tokens


def layer_config(case: dict) -> moekit.MoEConfig:
    return moekit.MoEConfig.from_dict({**LAYER_BASE, **case})


def build_layer(cfg: moekit.MoEConfig, backend: str, state: dict[str, Tensor]) -> moekit.MoE:
    """A training-mode layer on `backend` holding the weights and buffers in `state`."""
    moe = moekit.MoE(replace(cfg, backend=backend)).train()
    moe.load_state_dict(state)
    return moe


def layer_backends() -> list[str]:
    """Backends that run on CPU float32 here."""
    from moekit.backends import unsupported_reason

    cpu = torch.device("cpu")
    return [b for b in ("torch", "grouped_mm") if unsupported_reason(b, cpu, torch.float32) is None]


def _grads(module: torch.nn.Module) -> dict[str, Tensor]:
    return {f"grad.{n}": p.grad for n, p in module.named_parameters() if p.grad is not None}


def run_model(model: torch.nn.Module, tokens: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Forward with targets, backward of the total loss; outputs and every gradient."""
    model.zero_grad(set_to_none=True)
    result = model(tokens, targets)
    result.loss.backward()
    return {
        "out": result.out,
        "loss": result.loss,
        "task_loss": result.task_loss,
        "aux_loss": result.aux_loss,
        **_grads(model),
    }


def run_layer(moe: moekit.MoE, x: Tensor) -> dict[str, Tensor]:
    """Training forward and backward of sum(y * ramp) + aux_loss, then the training step's
    pre-optimiser hooks (the sigmoid bias); outputs, gradients, buffers."""
    moe.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y, info = moe(x)
    ramp = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    ((y * ramp).sum() + info.aux_loss).backward()
    for hook in optimizer_step_hooks(moe):
        hook()
    buffers = {f"buffer.{n}": b for n, b in moe.named_buffers() if n in moe.state_dict()}
    return {
        "y": y,
        "aux_loss": info.aux_loss,
        "experts": info.routing.experts,
        "weights": info.routing.weights,
        "grad.x": x.grad,
        **_grads(moe),
        **buffers,
    }


def _saveable(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}


def write_model(out: Path) -> None:
    # imported here: the test reuses run_model / run_layer and only needs moekit.load
    from moekit.model.config import ModelConfig
    from moekit.model.store import save_model_files
    from moekit.model.transformer import Transformer

    torch.manual_seed(SEED)
    model = Transformer(ModelConfig.from_dict(MODEL))
    with torch.no_grad():  # decisive routing: router logits well apart
        for block in model.blocks:
            if block.is_moe:
                block.ffn.router.weight.normal_()
    (out / "model").mkdir(parents=True, exist_ok=True)
    save_model_files(model, out / "model")
    model = moekit.load(out / "model")  # what the test will see
    tokens = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ))
    targets = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ))
    expected = run_model(model, tokens, targets)
    save_file(
        _saveable({"tokens": tokens, "targets": targets, **expected}),
        out / "model_expected.safetensors",
    )


def write_layers(out: Path) -> None:
    weights: dict[str, Tensor] = {}
    expected: dict[str, Tensor] = {}
    configs = {}
    for name, case in LAYER_CASES.items():
        torch.manual_seed(SEED)
        cfg = layer_config(case)
        moe = moekit.MoE(cfg)
        with torch.no_grad():  # spread logits and expert outputs so routing is decisive
            for p in moe.parameters():
                p.normal_(std=0.5)
            for n, b in moe.named_buffers():
                if n.endswith("expert_bias"):
                    b.normal_(std=0.1)
        state = {k: v.clone() for k, v in moe.state_dict().items()}
        weights.update({f"{name}.{k}": v for k, v in state.items()})
        x = torch.randn(*LAYER_LEAD, cfg.d_model)
        expected[f"{name}.x"] = x
        configs[name] = cfg.to_dict()
        for backend in layer_backends():
            for k, v in run_layer(build_layer(cfg, backend, state), x).items():
                expected[f"{name}.{backend}.{k}"] = v
    (out / "layers.json").write_text(json.dumps(configs, indent=2) + "\n")
    save_file(_saveable(weights), out / "layers.safetensors")
    save_file(_saveable(expected), out / "layers_expected.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    write_model(args.out)
    write_layers(args.out)


if __name__ == "__main__":
    main()
