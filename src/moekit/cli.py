"""The `moekit` command. Each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jsonargparse import ArgumentParser, Namespace


def _demo_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="Train a small MoE transformer and a dense one of equal active size on "
        "`signals` (CPU, under a minute on an idle 2-core machine) and show what the experts "
        "learned."
    )
    p.add_argument("--out", type=str, default="moekit-out", help="directory for plots and outputs")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--steps", type=int, default=1500, help="training steps of each model")
    return p


def _train_parser() -> ArgumentParser:
    from moekit.train.config import RunConfig

    p = ArgumentParser(
        description="Train a model from a YAML config: moekit train CONFIG [--key.sub VALUE ...]. "
        "Dotted options override the config; the run (logs, plots, checkpoints/) goes to --out."
    )
    p.add_argument("--config", action="config", help="YAML run config (also the first argument)")
    p.add_class_arguments(RunConfig, None)
    p.add_argument(
        "--resume",
        type=str | None,
        default=None,
        help="continue from a checkpoint or run dir (a bare --resume uses --out)",
    )
    return p


def _eval_parser() -> ArgumentParser:
    p = ArgumentParser(description="Evaluate a checkpoint (or a run dir's best one) on its task.")
    p.add_argument("path", type=str, help="checkpoint or run directory")
    p.add_argument("--batch-size", type=int, default=64, help="validation batch size")
    return p


def _generate_parser() -> ArgumentParser:
    p = ArgumentParser(description="Sample from a checkpoint: text, or a continuous rollout.")
    p.add_argument("path", type=str, help="checkpoint or run directory")
    p.add_argument(
        "--prompt",
        type=str,
        default="def ",
        help="text; for continuous models, values 'a,b,c' (vectors separated by ';')",
    )
    p.add_argument("--max-new", type=int, default=200, help="positions to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int | None, default=None, help="sample among the k best")
    p.add_argument("--top-p", type=float | None, default=0.95, help="nucleus probability mass")
    p.add_argument("--samples", type=int, default=1, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    return p


def _plot_parser() -> ArgumentParser:
    p = ArgumentParser(description="Redraw a run's dashboard and specialisation plots.")
    p.add_argument("run_dir", type=str, help="run directory (holds metrics.jsonl)")
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
    serve = ArgumentParser(description="Load-test `moekit serve` on a checkpoint (real server).")
    serve.add_argument("ckpt", type=str, help="checkpoint or run directory")
    serve.add_argument("--concurrency", type=list[int], default=[1, 8, 32])
    serve.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    serve.add_argument("--max-new-tokens", type=int, default=64)
    serve.add_argument("--threads", type=int, default=1, help="server torch threads")
    serve.add_argument("--out-dir", type=str, default="docs/benchmarks")
    sub.add_subcommand("serve", serve)
    librarian = ArgumentParser(description="Librarian deduplication: firing rate and output error.")
    librarian.add_argument("--tokens", type=int, default=2048)
    librarian.add_argument("--out-dir", type=str, default="docs/benchmarks")
    sub.add_subcommand("librarian", librarian)


def _add_finance(parent) -> None:
    p = ArgumentParser(description="Finance MoE: real market data routed to asset-class experts.")
    parent.add_subcommand("finance", p)
    sub = p.add_subcommands(dest="finance")
    demo = ArgumentParser(description="The whole finance pipeline on the data shipped with `arch`.")
    demo.add_argument("--out", type=str, default="moekit-out/finance")
    demo.add_argument("--seed", type=int, default=0)
    sub.add_subcommand("demo", demo)


def _serve_parser() -> ArgumentParser:
    p = ArgumentParser(description="Serve a checkpoint over HTTP (OpenAPI docs at /docs).")
    p.add_argument("ckpt", type=str, help="checkpoint or run directory")
    p.add_argument("--host", type=str, default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--device", type=str, default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int | None, default=None, help="torch CPU threads")
    p.add_argument("--max-batch", type=int | None, default=None, help="sequences per step")
    p.add_argument("--max-queue", type=int | None, default=None, help="queued requests before 429")
    p.add_argument("--api-key", action="append", help="accepted Bearer key (repeatable)")
    p.add_argument("--api-key-file", type=str | None, default=None, help="keys, one a line")
    p.add_argument("--rate-limit", type=str | None, default=None, help="per key: 5/s, 300/min")
    p.add_argument("--metrics-public", action="store_true", help="/metrics without a key")
    p.add_argument("--log-prompts", action="store_true", help="log prompt and completion text")
    p.add_argument(
        "--allow-unauthenticated", action="store_true", help="serve off loopback without keys"
    )
    p.add_argument("--ssl-certfile", type=str | None, default=None, help="PEM cert: serve HTTPS")
    p.add_argument("--ssl-keyfile", type=str | None, default=None, help="PEM key of the cert")
    return p


def _layer_demo_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="A bare MoE layer learns a 4-regime regression (< 1 min on a CPU); prints "
        "expert load and regime -> expert routing purity, writes a heatmap."
    )
    p.add_argument("--out", type=str, default="moekit-out", help="directory for the heatmap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=600)
    return p


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="moekit", description="Mixture-of-Experts on PyTorch.")
    sub = parser.add_subcommands(dest="command")
    sub.add_subcommand("demo", _demo_parser())
    sub.add_subcommand("train", _train_parser())
    sub.add_subcommand("eval", _eval_parser())
    sub.add_subcommand("generate", _generate_parser())
    sub.add_subcommand("plot", _plot_parser())
    sub.add_subcommand("serve", _serve_parser())
    sub.add_subcommand("layer-demo", _layer_demo_parser())
    _add_bench(sub)
    _add_finance(sub)
    return parser


def _run_demo(args: Namespace) -> None:
    from moekit.train.demo import run_demo

    run_demo(out_dir=args.out, seed=args.seed, steps=args.steps)


def _run_train(args: Namespace) -> None:
    from moekit.train.commands import train

    train(args)


def _run_eval(args: Namespace) -> None:
    from moekit.train.commands import evaluate

    evaluate(args.path, args.batch_size)


def _run_generate(args: Namespace) -> None:
    from moekit.train.commands import generate

    generate(args)


def _run_plot(args: Namespace) -> None:
    from moekit.viz import plot_run

    for path in plot_run(args.run_dir):
        print(path)


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
    elif args.bench == "serve":
        from moekit.bench.serve import run as run_serve

        a = args.serve
        run_serve(
            a.ckpt,
            concurrency=tuple(a.concurrency),
            requests=a.requests,
            out_dir=a.out_dir,
            max_new_tokens=a.max_new_tokens,
            threads=a.threads,
        )
    elif args.bench == "librarian":
        from moekit.bench.librarian import main as run_librarian

        a = args.librarian
        run_librarian(["--tokens", str(a.tokens), "--out-dir", a.out_dir])


def _run_serve(args: Namespace) -> None:
    from moekit.serve import run_server
    from moekit.serve.security import SecurityConfig, SecurityConfigError

    given = (
        ("max_batch", args.max_batch),
        ("max_queue", args.max_queue),
        ("ssl_certfile", args.ssl_certfile),
        ("ssl_keyfile", args.ssl_keyfile),
        ("allow_unauthenticated", args.allow_unauthenticated or None),
    )
    options = {k: v for k, v in given if v is not None}
    policy = (
        args.api_key,
        args.api_key_file,
        args.rate_limit,
        args.metrics_public,
        args.log_prompts,
    )
    try:
        if any(policy):  # otherwise run_server reads keys from $MOEKIT_API_KEY alone
            options["security"] = SecurityConfig.from_options(
                args.api_key or (),
                args.api_key_file,
                rate_limit=args.rate_limit,
                metrics_public=args.metrics_public,
                log_prompts=args.log_prompts,
            )
        run_server(
            args.ckpt,
            host=args.host,
            port=args.port,
            device=args.device,
            threads=args.threads,
            **options,
        )
    except SecurityConfigError as err:  # one line, no traceback
        print(f"moekit serve: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _run_layer_demo(args: Namespace) -> None:
    from moekit.demo import run_demo

    run_demo(out_dir=args.out, seed=args.seed, steps=args.steps)


def _run_finance(args: Namespace) -> None:
    from moekit.tasks.finance.demo import run_demo

    run_demo(out_dir=args.demo.out, seed=args.demo.seed)


_HANDLERS = {
    "demo": _run_demo,
    "train": _run_train,
    "eval": _run_eval,
    "generate": _run_generate,
    "plot": _run_plot,
    "bench": _run_bench,
    "finance": _run_finance,
    "serve": _run_serve,
    "layer-demo": _run_layer_demo,
}


def _normalise_train_argv(argv: list[str]) -> list[str]:
    """`train CONFIG ...` -> `train --config CONFIG ...`; a bare `--resume` -> `--resume auto`."""
    if not argv or argv[0] != "train":
        return argv
    rest = argv[1:]
    if rest and not rest[0].startswith("-"):
        rest = ["--config", rest[0], *rest[1:]]
    out = []
    for i, arg in enumerate(rest):
        out.append(arg)
        if arg == "--resume" and (i + 1 == len(rest) or rest[i + 1].startswith("--")):
            out.append("auto")
    return ["train", *out]


def main(argv: Sequence[str] | None = None) -> int:
    argv = _normalise_train_argv(list(argv) if argv is not None else sys.argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except ValueError as err:  # a dataclass config rejected a value; its message names the key
        print(f"moekit: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    _HANDLERS[args.command](args[args.command])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
