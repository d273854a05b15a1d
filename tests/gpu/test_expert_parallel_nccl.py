"""ExpertParallelMoE over NCCL on 2 GPUs equals `moekit.MoE` on each rank's tokens.

The test launches this file under torchrun (CUDA needs fresh processes, not forks); run as a
script, each rank checks every backend that runs here and exits non-zero on a mismatch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # max-norm relative error


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def _check(backend: str, dtype: torch.dtype, capacity_factor: float | None) -> None:
    import copy

    import torch.distributed as dist

    from moekit import MoE, MoEConfig
    from moekit.parallel import ExpertParallelMoE, gather_experts

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = MoEConfig(
        d_model=256, d_hidden=96, n_experts=16, k=4, capacity_factor=capacity_factor,
        backend=backend,
    )  # fmt: skip
    torch.manual_seed(0)
    dense = MoE(cfg).cuda().to(dtype)
    ep = ExpertParallelMoE.from_dense(dense)
    g = torch.Generator().manual_seed(1)
    T_R = [333, 17][:world]  # unequal, not multiples of any block
    xs = [torch.randn(T, 256, generator=g).cuda().to(dtype) for T in T_R]
    dys = [torch.randn(T, 256, generator=g).cuda().to(dtype) for T in T_R]
    w1_grad_ref = torch.zeros_like(dense.experts.w1)
    for r in range(world):
        ref = copy.deepcopy(dense)
        x_ref = xs[r].clone().requires_grad_()
        y_ref, info_ref = ref(x_ref)
        y_ref.backward(dys[r])
        w1_grad_ref += ref.experts.w1.grad
        if r == rank:
            mine = (y_ref.detach(), x_ref.grad, ref.router.weight.grad, info_ref.routing.experts)
    x = xs[rank].clone().requires_grad_()
    y, info = ep(x)
    y.backward(dys[rank])
    tol, what = TOLERANCE[dtype], f"{backend} {dtype} cf={capacity_factor} rank {rank}"
    assert torch.equal(info.routing.experts, mine[3]), f"{what}: kept experts differ"
    for name, got, want in (
        ("y", y, mine[0]),
        ("x.grad", x.grad, mine[1]),
        ("router.grad", ep.router.weight.grad, mine[2]),
        ("w1.grad", gather_experts(ep.experts.w1.grad), w1_grad_ref),
    ):
        err = _rel(got, want)
        assert err < tol, f"{what}: {name} relative error {err:.3g} >= {tol}"


def _main() -> None:
    import torch.distributed as dist

    from moekit.backends import available_backends, unsupported_reason

    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device("cuda", torch.cuda.current_device())
    for backend in available_backends():
        for dtype in (torch.float32, torch.bfloat16):
            if unsupported_reason(backend, device, dtype) is not None:
                continue
            for capacity_factor in (None, 0.75):
                _check(backend, dtype, capacity_factor)
                if dist.get_rank() == 0:
                    print(f"ok {backend} {dtype} capacity_factor={capacity_factor}", flush=True)
    dist.destroy_process_group()


def test_nccl_two_gpus_match_the_dense_layer():
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", __file__]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "ok torch torch.float32 capacity_factor=None" in done.stdout


if __name__ == "__main__":
    _main()
