"""Train a small MoE transformer with its experts split over the ranks (expert parallelism).

Every rank builds the same dense model (same seed), keeps its share of each MoE layer's
experts, trains on its own batches, and reduces gradients as data parallelism does. The
result is saved in the single-process format, loadable with any number of ranks.

    torchrun --nproc-per-node 2 examples/torchrun_expert_parallel.py            # CPU, gloo
    torchrun --nproc-per-node 8 examples/torchrun_expert_parallel.py --steps 50  # GPUs, NCCL
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from moekit import MoEConfig
from moekit.model.config import ModelConfig
from moekit.model.transformer import Transformer
from moekit.parallel import ExpertParallelMoE, parallelize_experts
from moekit.parallel.checkpoint import save_safetensors
from moekit.parallel.data_parallel import clip_grad_norm_, reduce_gradients_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--save", default="ep-model.safetensors")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same dense model on every rank
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, max_seq_len=32)
    cfg.moe = MoEConfig(d_model=64, d_hidden=128, n_experts=args.experts, k=2)
    model = parallelize_experts(Transformer(cfg).to(device))  # group=None: all ranks
    layer = next(m for m in model.modules() if isinstance(m, ExpertParallelMoE))
    last = layer.first_expert + layer.n_local - 1
    print(f"rank {rank}/{world}: experts {layer.first_expert}..{last}")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    for step in range(args.steps):
        start = torch.randint(0, 64, (8, 1), generator=gen)
        tokens = (start + torch.arange(17)) % 64  # learn "next token = this token + 1"
        tokens = tokens.to(device)
        out = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        reduce_gradients_(model)  # replicated grads averaged, expert grads scaled to match
        clip_grad_norm_(model, 1.0)  # one norm over all ranks' experts: the same clip everywhere
        opt.step()
        if step % 5 == 0 or step == args.steps - 1:
            loss = out.loss.detach().clone()
            dist.all_reduce(loss)
            if rank == 0:
                print(f"step {step:3d}  loss {loss.item() / world:.3f}")  # host sync: logging

    save_safetensors(model, args.save)  # dense format: experts gathered, written by rank 0
    if rank == 0:
        print(f"saved {args.save}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
