"""ExpertParallelMoE over NCCL on 2 (and 4) GPUs equals `moekit.MoE` on each rank's tokens.

The test launches this file under torchrun (CUDA needs fresh processes, not forks); run as a
script, each rank checks every backend that runs here, in float32 and bfloat16, without and
with capacity drops, and with every token routed to rank 0's experts (the other ranks receive
none); it exits non-zero on a mismatch. Output, input gradient and every parameter's gradient
are compared (expert gradients gathered over the ranks, the oracle's summed over them).
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
E, D = 16, 256


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.float().abs().max().clamp_min(1e-12)
    return float((got.detach().float() - want.float()).abs().max() / scale)


def _check(backend: str, dtype: torch.dtype, capacity_factor: float | None, skew: bool) -> None:
    import copy

    import torch.distributed as dist

    from moekit import MoE, MoEConfig
    from moekit.parallel import ExpertParallelMoE, gather_experts

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = MoEConfig(
        d_model=D, d_hidden=96, n_experts=E, k=4, capacity_factor=capacity_factor,
        n_shared_experts=1, backend=backend,
    )  # fmt: skip
    torch.manual_seed(0)
    dense = MoE(cfg).cuda().to(dtype)
    L = E // world
    if skew:  # positive inputs score far higher on rank 0's experts: the others receive none
        sign = torch.tensor([1.0] * L + [-1.0] * (E - L), device="cuda")
        with torch.no_grad():
            dense.router.weight.copy_(sign.unsqueeze(-1).expand(E, D) * 0.05)
    ep = ExpertParallelMoE.from_dense(dense)
    g = torch.Generator().manual_seed(1)
    T_R = [333, 17, 0, 128][:world]  # unequal, not multiples of any block, one rank empty
    xs = [torch.randn(T, D, generator=g) for T in T_R]
    xs = [(x.abs() + 0.5 if skew else x).cuda().to(dtype) for x in xs]
    dys = [torch.randn(T, D, generator=g).cuda().to(dtype) for T in T_R]
    expert_grads: dict[str, torch.Tensor] = {}
    for r in range(world):
        ref = copy.deepcopy(dense)
        x_ref = xs[r].clone().requires_grad_()
        y_ref, info_ref = ref(x_ref)
        y_ref.backward(dys[r])
        for name, p in ref.experts.named_parameters():
            grad = torch.zeros_like(p) if p.grad is None else p.grad
            expert_grads[name] = expert_grads.get(name, 0) + grad.float()
        if r == rank:
            mine = (y_ref.detach(), x_ref.grad, info_ref.routing.experts)
            other_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    x = xs[rank].clone().requires_grad_()
    y, info = ep(x)
    y.backward(dys[rank])
    what = f"{backend} {dtype} cf={capacity_factor} skew={skew} rank {rank}"
    tol = TOLERANCE[dtype]
    assert torch.equal(info.routing.experts, mine[2]), f"{what}: kept experts differ"
    if skew:
        assert (info.routing.experts < L).all(), f"{what}: tokens reached other ranks' experts"
    pairs = [("y", y, mine[0]), ("x.grad", x.grad, mine[1])]
    for name, p in ep.named_parameters():
        grad = torch.zeros_like(p) if p.grad is None else p.grad
        if name.startswith("experts."):
            pairs.append((name, gather_experts(grad), expert_grads[name.removeprefix("experts.")]))
        elif name in other_grads:
            pairs.append((name, grad, other_grads[name]))
    for name, got, want in pairs:
        if want.numel():  # an all-zero reference (no token reached it) wants exact zeros
            err = _rel(got, want)
            assert err < tol, f"{what}: {name} relative error {err:.3g} >= {tol}"


def _main() -> None:
    import torch.distributed as dist

    from moekit.backends import available_backends, unsupported_reason

    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    device = torch.device("cuda", torch.cuda.current_device())
    world = dist.get_world_size()
    for backend in available_backends():
        for dtype in (torch.float32, torch.bfloat16):
            if unsupported_reason(backend, device, dtype) is not None:
                continue
            for capacity_factor, skew in ((None, False), (0.75, False), (None, True)):
                _check(backend, dtype, capacity_factor, skew)
                if dist.get_rank() == 0:
                    print(
                        f"ok ep={world} {backend} {dtype} capacity_factor={capacity_factor} "
                        f"skew={skew}",
                        flush=True,
                    )
    dist.destroy_process_group()


def _torchrun(nproc: int) -> str:
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(nproc), __file__]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


def test_nccl_two_gpus_match_the_dense_layer():
    out = _torchrun(2)
    assert "ok ep=2 torch torch.float32 capacity_factor=None skew=False" in out
    assert "ok ep=2 torch torch.bfloat16 capacity_factor=None skew=True" in out


@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 CUDA GPUs")
def test_nccl_four_gpus_match_the_dense_layer():
    out = _torchrun(4)
    assert "ok ep=4 torch torch.float32 capacity_factor=0.75 skew=False" in out


if __name__ == "__main__":
    _main()
