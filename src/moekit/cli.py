"""The `moekit` command. Each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jsonargparse import ArgumentParser, Namespace


def _demo_parser() -> ArgumentParser:
    p = ArgumentParser(description="Train a small MoE on a CPU and show what its experts learned.")
    p.add_argument("--out", type=str, default="moekit-out", help="directory for plots and outputs")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    return p


def _add_bench(parent) -> None:
    p = ArgumentParser(description="Benchmarks that write docs/benchmarks/ files.")
    parent.add_subcommand("bench", p)  # jsonargparse: attach a level before nesting under it
    sub = p.add_subcommands(dest="bench")
    layer = ArgumentParser(
        description="MoE layer speed: each backend vs the naive loop and dense-eq."
    )
    layer.add_argument("--device", type=str, default="cpu", help="cpu or cuda")
    layer.add_argument(
        "--graph", type=bool, default=False, help="CUDA only: time CUDA-graph replay"
    )
    layer.add_argument(
        "--repeats", type=int, default=15, help="timed repetitions (median reported)"
    )
    layer.add_argument("--out-dir", type=str, default="docs/benchmarks", help="where results go")
    sub.add_subcommand("layer", layer)
    memory = ArgumentParser(description="Knowledge-store query latency at growing sizes.")
    memory.add_argument("--sizes", type=list[int], default=[10_000, 100_000, 1_000_000])
    memory.add_argument("--dim", type=int, default=512)
    memory.add_argument("--out-dir", type=str, default="docs/benchmarks")
    sub.add_subcommand("memory", memory)


def _add_finance(parent) -> None:
    p = ArgumentParser(description="Finance MoE: real market data routed to asset-class experts.")
    parent.add_subcommand("finance", p)
    sub = p.add_subcommands(dest="finance")
    demo = ArgumentParser(description="The whole finance pipeline on the data shipped with `arch`.")
    demo.add_argument("--out", type=str, default="moekit-out/finance")
    demo.add_argument("--seed", type=int, default=0)
    sub.add_subcommand("demo", demo)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="moekit", description="Mixture-of-Experts on PyTorch.")
    sub = parser.add_subcommands(dest="command")
    sub.add_subcommand("demo", _demo_parser())
    _add_bench(sub)
    _add_finance(sub)
    return parser


def _run_demo(args: Namespace) -> None:
    from moekit.demo import run_demo

    run_demo(out_dir=args.out, seed=args.seed)


def _run_bench(args: Namespace) -> None:
    if args.bench == "layer":
        a = args.layer
        if a.device.startswith("cuda"):
            from moekit.bench.layer_cuda import run as run_cuda

            run_cuda(graph=a.graph, out_dir=a.out_dir)
        else:
            from moekit.bench.layer import run

            run(device=a.device, repeats=a.repeats, out_dir=a.out_dir)
    elif args.bench == "memory":
        from moekit.bench.memory import bench_memory

        a = args.memory
        bench_memory(sizes=tuple(a.sizes), dim=a.dim, out_dir=a.out_dir)


def _run_finance(args: Namespace) -> None:
    from moekit.tasks.finance.demo import run_demo

    run_demo(out_dir=args.demo.out, seed=args.demo.seed)


_HANDLERS = {"demo": _run_demo, "bench": _run_bench, "finance": _run_finance}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else sys.argv[1:])
    _HANDLERS[args.command](args[args.command])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
