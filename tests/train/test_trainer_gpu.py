"""The trainer on a GPU: fused AdamW, bf16 experts, compile, checkpointing, pinned prefetch."""

from dataclasses import replace

import pytest
import torch

from moekit.train import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("checkpointing", ["none", "experts", "blocks"])
@pytest.mark.parametrize("backend", ["triton", "grouped_mm"])
def test_compiled_bf16_run_steps_on_cuda(tmp_path, make_run, backend, checkpointing):
    cfg = make_run(
        tmp_path,
        device="cuda",
        precision="bf16",
        compile=True,
        activation_checkpointing=checkpointing,
        grad_accum=2,
    )
    cfg = replace(cfg, model=replace(cfg.model, moe=replace(cfg.model.moe, backend=backend)))
    trainer = Trainer(cfg)
    assert trainer.optimizer.defaults["fused"] is True
    assert trainer.batches._pool is not None  # batches built ahead, pinned
    losses = []
    for _ in range(3):
        losses.append(trainer.train_step()["loss"])
        trainer.step += 1
    trainer.close()
    assert all(torch.isfinite(loss) for loss in losses)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
