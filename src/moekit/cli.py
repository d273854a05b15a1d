"""The `moekit` command. Each subcommand is a thin wrapper over a library function.

A user's mistake (a bad option, config, file or checkpoint, a missing extra) ends the
command with one line `moekit: error: ...` and exit code 2; usage text only with --help.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from collections.abc import Iterator, Sequence
from typing import Any

from jsonargparse import ActionYesNo, ArgumentParser, Namespace

from moekit.errors import missing_extra

# what a user can cause and fix: printed as one line, never as a traceback
USER_ERRORS = (
    argparse.ArgumentError,
    ValueError,  # bad values, configs and damaged checkpoints (CheckpointError) name the field
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


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


def _task_options() -> str:
    """'signals (noise), text (max_bytes, val_every), ...': each task's --task.options keys."""
    from moekit.tasks import available_tasks, task_class

    def keys(name: str) -> str:
        return ", ".join(f.name for f in dataclasses.fields(task_class(name).Options)) or "none"

    return ", ".join(f"{name} ({keys(name)})" for name in available_tasks())


def _train_parser() -> ArgumentParser:
    from moekit.train.config import RunConfig

    p = ArgumentParser(
        description="Train a model from a YAML config: moekit train CONFIG [--key.sub VALUE ...]. "
        "Dotted options override the config; the run (logs, plots, checkpoints/) goes to --out. "
        f"Tasks (--task.name) and their options (--task.options.KEY): {_task_options()}."
    )
    p.add_argument("--config", action="config", help="YAML run config (also the first argument)")
    p.add_class_arguments(RunConfig, None)
    p.add_argument(
        "--resume",
        type=str | None,
        default=None,
        help="continue from a checkpoint or run dir (a bare --resume uses --out)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="--out holds another run: move it aside to OUT.old-<time> (never deleted)",
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
        type=str | None,
        default=None,
        help="text (default 'def '); continuous models need values 'a,b,c' (vectors split by ';')",
    )
    p.add_argument("--max-new", type=int, default=200, help="positions to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int | None, default=None, help="sample among the k best")
    p.add_argument("--top-p", type=float | None, default=0.95, help="nucleus probability mass")
    p.add_argument("--samples", type=int, default=1, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    return p


def _plot_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="Redraw a run's dashboard and specialisation plots, and its task's own "
        "analysis plots from the best checkpoint."
    )
    p.add_argument("run_dir", type=str, help="run directory (holds metrics.jsonl)")
    return p


def _profile_parser() -> ArgumentParser:
    from moekit.profiling import MODES

    p = ArgumentParser(
        description="Profile one training step or one decode step of a model by stage (router, "
        "plan, experts, finish, attention, backward, optimizer): a Chrome/Perfetto trace, a "
        "stage table and chart, memory. Per-kernel CUDA time of the Triton kernels alone is "
        "`moekit bench profile`."
    )
    p.add_argument("path", type=str, help="run config (YAML) or checkpoint / run directory")
    p.add_argument("--mode", type=str, default="train", help=f"one of {MODES}")
    p.add_argument("--device", type=str, default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--batch-size", type=int | None, default=None, help="default: the config's")
    p.add_argument("--context", type=int | None, default=None, help="decode: prompt positions")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=1, help="profiled steps (the table: per step)")
    p.add_argument("--out", type=str, default="moekit-out/profile", help="output directory")
    return p


def _sweep_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="Short training runs over experts x k x capacity factor x router from a run "
        "config; a table and trade-off plots in --out. Finished points are not rerun."
    )
    p.add_argument("config", type=str, help="run config (YAML), as moekit train reads")
    p.add_argument("--grid", type=str | None, default=None, help="YAML with the axes below")
    p.add_argument("--experts", type=list[int], default=[], help="e.g. [4,8,16]")
    p.add_argument("--k", type=list[int], default=[], help="e.g. [1,2]")
    p.add_argument(
        "--capacity", type=list[float | str | None], default=[], help="e.g. [1.0,1.25,none]"
    )
    p.add_argument("--router", type=list[str], default=[], help="e.g. [topk,sinkhorn]")
    p.add_argument("--steps", type=int | None, default=None, help="steps per point (200)")
    p.add_argument("--out", type=str, default="moekit-out/sweep", help="output directory")
    return p


def _bench_parser(spec: Any) -> ArgumentParser:
    """Options of one benchmark from its config dataclass; required fields are positional."""
    p = ArgumentParser(description=spec.help)
    hints = typing.get_type_hints(spec.config)
    for f in dataclasses.fields(spec.config):
        help_text = f.metadata.get("help", "")
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            p.add_argument(f.name, type=hints[f.name], help=help_text)
            continue
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] is bool:  # --graph / --no-graph, as switches are written elsewhere
            p.add_argument(
                flag, action=ActionYesNo(no_prefix="no-"), default=default, help=help_text
            )
        else:
            p.add_argument(flag, type=hints[f.name], default=default, help=help_text)
    return p


def _add_group(parent: Any, name: str, description: str) -> Any:
    """`moekit NAME ...`: a command whose own subcommands go on the returned action."""
    p = ArgumentParser(description=description)
    parent.add_subcommand(name, p)  # jsonargparse: attach a level before nesting under it
    return p.add_subcommands(dest=name)


def _add_bench(parent) -> None:
    from moekit.bench.registry import available_benches, bench_spec

    sub = _add_group(
        parent,
        "bench",
        "Benchmarks. Each writes a .md table, a .json (machine, GPU, versions, date, command) "
        "and a .png chart to --out-dir, docs/benchmarks/ by default. Lists are written [1,8,32].",
    )
    for name in available_benches():
        spec = bench_spec(name)
        sub.add_subcommand(name, _bench_parser(spec), help=spec.help)


def _add_finance(parent) -> None:
    sub = _add_group(
        parent, "finance", "Finance MoE: real market data routed to asset-class experts."
    )
    demo = ArgumentParser(
        description="The whole finance pipeline: the data shipped with `arch` (default), CSV "
        "files or tickers (needs moekit[finance-data] and a network)."
    )
    demo.add_argument("--out", type=str, default="moekit-out/finance")
    demo.add_argument("--seed", type=int, default=0, help="first training seed")
    demo.add_argument("--seeds", type=int, default=3, help="training seeds (mean, 95 percent CI)")
    demo.add_argument("--csv", action="append", help="PATH or PATH=<asset class> (repeatable)")
    demo.add_argument("--tickers", type=list[str], default=[], help="e.g. [SPY,TLT=Fixed Income]")
    demo.add_argument("--start", type=str, default="2000-01-01", help="tickers: first date")
    demo.add_argument("--end", type=str | None, default=None, help="tickers: last date")
    demo.add_argument("--test-years", type=list[int], default=[], help="default: the last 3")
    demo.add_argument("--epochs", type=int | None, default=None, help="training epochs (12)")
    sub.add_subcommand("demo", demo)


def _serve_parser() -> ArgumentParser:
    from moekit.serve.config import EngineConfig

    p = ArgumentParser(description="Serve a checkpoint over HTTP (OpenAPI docs at /docs).")
    p.add_argument("ckpt", type=str, help="checkpoint or run directory")
    p.add_argument("--host", type=str, default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 (or a taken port): a free one")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", type=str | None, default=None, help="weights: bf16, fp16, fp32")
    p.add_argument("--threads", type=int | None, default=None, help="torch CPU threads")
    p.add_argument("--cors-origin", action="append", help="browser origin allowed (repeatable)")
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
    hints = typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):  # --max-batch, --kv-memory, --prefill-chunk...
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, type=hints[f.name] | None, default=None, help=f"default {f.default}")
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
    sub.add_subcommand("profile", _profile_parser())
    sub.add_subcommand("sweep", _sweep_parser())
    sub.add_subcommand("serve", _serve_parser())
    sub.add_subcommand("layer-demo", _layer_demo_parser())
    _add_bench(sub)
    _add_finance(sub)
    _add_hf(sub)
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
    from moekit.viz import plot_run, plot_task

    for path in plot_run(args.run_dir) + plot_task(args.run_dir):
        print(path)


def _run_profile(args: Namespace) -> None:
    from moekit.profiling import ProfileConfig, profile_step

    result = profile_step(ProfileConfig(**args.as_dict()))
    for path in result["files"].values():
        print(f"wrote {path}")


def _run_sweep(args: Namespace) -> None:
    from moekit.sweep import SweepConfig, run_sweep

    given = args.as_dict()
    grid = given.pop("grid")
    given["capacity_factor"] = given.pop("capacity")
    result = run_sweep(SweepConfig.with_grid(grid, **given))
    for path in result["files"].values():
        print(f"wrote {path}")


def _run_bench(args: Namespace) -> None:
    from moekit.bench.registry import bench_spec, run_config

    name = args.bench
    cfg = bench_spec(name).config(**args[name].as_dict())  # a ValueError names the option
    report = run_config(name, cfg)
    if report.get("markdown"):
        print(report["markdown"])
    for path in report.get("files", []):
        print(f"wrote {path}")
    if report.get("chart"):
        print(f"wrote {report['chart']['file']}")


def _check_serve_args(args: Namespace) -> None:
    """What uvicorn or torch would otherwise refuse with a traceback, named by its option."""
    import torch

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port={args.port} must be in [0, 65535] (0: a free port)")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads={args.threads} must be >= 1")
    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device={args.device!r} is not auto, cpu or cuda[:i]") from None
        gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        if device.type == "cuda" and (gpus == 0 or (device.index or 0) >= gpus):
            raise ValueError(f"--device={args.device}: no such CUDA device ({gpus} visible)")


def _run_serve(args: Namespace) -> None:
    _check_serve_args(args)
    from moekit.serve import run_server
    from moekit.serve.config import EngineConfig
    from moekit.serve.security import SecurityConfig, SecurityConfigError

    engine = {f.name: args[f.name] for f in dataclasses.fields(EngineConfig)}
    given = (
        *engine.items(),
        ("dtype", args.dtype),
        ("cors_origins", args.cors_origin),
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
        EngineConfig.from_options({k: v for k, v in engine.items() if v is not None})
        if any(policy):  # otherwise run_server reads keys from $MOEKIT_API_KEY alone
            options["security"] = SecurityConfig.from_options(
                args.api_key or (),
                args.api_key_file,
                rate_limit=args.rate_limit,
                metrics_public=args.metrics_public,
                log_prompts=args.log_prompts,
            )
    except ValueError as err:  # a bad option or key; one line, no traceback
        _fail(str(err))
    try:
        run_server(
            args.ckpt,
            host=args.host,
            port=args.port,
            device=args.device,
            threads=args.threads,
            **options,
        )
    except SecurityConfigError as err:  # refused to start (e.g. open off loopback)
        _fail(str(err))


def _run_layer_demo(args: Namespace) -> None:
    from moekit.demo import run_demo

    run_demo(out_dir=args.out, seed=args.seed, steps=args.steps)


def _run_finance(args: Namespace) -> None:
    from moekit.tasks.finance.demo import run_demo

    d = args.demo
    run_demo(
        out_dir=d.out, seed=d.seed, seeds=d.seeds, csv=d.csv or (), tickers=d.tickers,
        start=d.start, end=d.end, test_years=tuple(d.test_years) or None, epochs=d.epochs,
    )  # fmt: skip


def _conversion_parser(
    description: str, source: str, source_help: str, out_help: str
) -> ArgumentParser:
    """One direction of `moekit convert`: the directory read (`source`) and the one written."""
    p = ArgumentParser(description=description)
    p.add_argument(source, type=str, help=source_help)
    p.add_argument("out", type=str, help=out_help)
    return p


def _add_dtype(p: ArgumentParser) -> None:
    """--dtype of the weights written; None keeps the checkpoint's own."""
    p.add_argument("--dtype", type=str | None, default=None, help="bf16, fp16, fp32")


def _add_hf(parent) -> None:
    """`moekit convert ...` and `moekit route-report`: Hugging Face checkpoints (moekit[hf])."""
    sub = _add_group(parent, "convert", "Convert MoE checkpoints between Hugging Face and moekit.")
    to_moekit = _conversion_parser(
        "An HF MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) as a moekit checkpoint, its "
        "tokenizer files beside it.",
        "hf_dir",
        "HF checkpoint directory (safetensors)",
        "new moekit checkpoint directory",
    )
    to_moekit.add_argument(
        "--max-seq-len",
        type=int | None,
        default=None,
        help="longest context (serving sizes its KV slots by it); default max_position_embeddings",
    )
    _add_dtype(to_moekit)
    sub.add_subcommand("hf-to-moekit", to_moekit)
    to_hf = _conversion_parser(
        "A moekit checkpoint whose architecture maps onto Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE "
        "as an HF checkpoint AutoModelForCausalLM loads.",
        "ckpt",
        "moekit checkpoint directory",
        "new HF checkpoint directory",
    )
    _add_dtype(to_hf)
    sub.add_subcommand("moekit-to-hf", to_hf)
    report = ArgumentParser(
        description="Per-layer expert load, router entropy and dead experts of an HF MoE "
        "model on a text file; prints a table and draws a layers x experts heatmap."
    )
    report.add_argument("hf_dir", type=str, help="HF checkpoint directory with tokenizer.json")
    report.add_argument("--text", type=str, required=True, help="UTF-8 text file to route")
    report.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    report.add_argument("--max-tokens", type=int, default=16384, help="tokens read at most")
    report.add_argument("--plot", type=str, default="route-report.png", help="heatmap PNG")
    report.add_argument("--device", type=str, default="auto", help="auto, cpu or cuda")
    parent.add_subcommand("route-report", report)


def _hf_command(name: str, run) -> None:
    """Run an HF command; a refusal or a missing extra ends it with one line."""
    from moekit.integrations.hf import UnsupportedCheckpoint

    try:
        run()
    except (UnsupportedCheckpoint, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"moekit {name}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    except ImportError as err:
        print(f"moekit {name}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


def _run_convert(args: Namespace) -> None:
    from moekit.integrations.hf import hf_to_moekit, moekit_to_hf

    direction = args.convert
    a = args[direction]
    if direction == "hf-to-moekit":
        run = lambda: hf_to_moekit(a.hf_dir, a.out, a.max_seq_len, a.dtype)  # noqa: E731
    else:
        run = lambda: moekit_to_hf(a.ckpt, a.out, a.dtype)  # noqa: E731
    _hf_command(f"convert {direction}", run)
    print(f"wrote {a.out}")


def _run_route_report(args: Namespace) -> None:
    from pathlib import Path

    from moekit.integrations.hf.report import report_text

    def run() -> None:
        text = Path(args.text).read_text(encoding="utf-8")
        report_text(args.hf_dir, text, args.seq_len, args.max_tokens, args.plot, args.device)

    _hf_command("route-report", run)
    print(f"wrote {args.plot}")


_HANDLERS = {
    "demo": _run_demo,
    "train": _run_train,
    "eval": _run_eval,
    "generate": _run_generate,
    "plot": _run_plot,
    "profile": _run_profile,
    "sweep": _run_sweep,
    "bench": _run_bench,
    "finance": _run_finance,
    "serve": _run_serve,
    "layer-demo": _run_layer_demo,
    "convert": _run_convert,
    "route-report": _run_route_report,
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


def _parsers(parser: ArgumentParser) -> Iterator[ArgumentParser]:
    """`parser` and every subcommand parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def _one_line(err: BaseException) -> str:
    """An error message on one line; a parser's long type report cut to what was expected."""
    text = str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    given = [line for line in lines if line.startswith("Given value:")]
    expected = re.findall(r"Expected a <class '([\w.]+)'>", text)
    if given and expected:
        return f"{lines[0]} expected {' or '.join(expected)}; {given[0].lower()}"
    return " ".join(lines) or type(err).__name__


def _fail(message: str) -> typing.NoReturn:
    print(f"moekit: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> int:
    argv = _normalise_train_argv(list(argv) if argv is not None else sys.argv[1:])
    command = argv[0] if argv else None
    try:
        parser = build_parser()
        for p in _parsers(parser):  # errors come back here, not as usage text and exit
            p.exit_on_error = False
        args = parser.parse_args(argv)
        _HANDLERS[args.command](args[args.command])
    except ModuleNotFoundError as err:
        advice = missing_extra(err, command)
        if advice is None:
            raise
        _fail(advice)
    except USER_ERRORS as err:
        _fail(_one_line(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
