"""Commands on a run: `moekit train`, `moekit eval`, `moekit generate` and `moekit plot`.

A user's mistake raises ValueError (or FileNotFoundError) naming the option or file; the
`moekit` command prints it as one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moekit.commands import argument, command, nested, option
from moekit.commands.runs import resolve_run
from moekit.model.sampling_rules import check_sampling
from moekit.model.store import load_files, pick_checkpoint
from moekit.model.transformer import Transformer
from moekit.tasks import available_tasks, build_task, task_class
from moekit.train.checkpoint import run_config_of
from moekit.train.config import RunConfig
from moekit.train.metrics import evaluate_model
from moekit.train.rundir import claim_run_dir, run_lock
from moekit.train.trainer import Trainer

DEFAULT_TEXT_PROMPT = "def "
# what the generate options are called on the command line
OPTION_NAMES = {
    "max_new_tokens": "--max-new",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "seed": "--seed",
}


def _task_options() -> str:
    """'signals (noise), text (max_bytes, val_every), ...': each task's --task.options keys."""

    def keys(name: str) -> str:
        return ", ".join(f.name for f in dataclasses.fields(task_class(name).Options)) or "none"

    return ", ".join(f"{name} ({keys(name)})" for name in available_tasks())


def train_argv(rest: list[str]) -> list[str]:
    """`train CONFIG ...` -> `train --config CONFIG ...`; a bare `--resume` -> `--resume auto`."""
    if rest and not rest[0].startswith("-"):
        rest = ["--config", rest[0], *rest[1:]]
    out = []
    for i, arg in enumerate(rest):
        out.append(arg)
        if arg == "--resume" and (i + 1 == len(rest) or rest[i + 1].startswith("--")):
            out.append("auto")
    return out


@dataclass
class Train:
    """A whole run config (YAML and dotted options) and what to do with an existing --out."""

    run: RunConfig = nested(RunConfig, "YAML run config (also the first argument)")
    resume: str | None = option(
        None, "continue from a checkpoint or run dir (a bare --resume uses --out)"
    )
    overwrite: bool = option(
        False, "--out holds another run: move it aside to OUT.old-<time> (never deleted)"
    )


@command(
    "train",
    Train,
    help="Train a model from a YAML config: moekit train CONFIG [--key.sub VALUE ...]. "
    "Dotted options override the config; the run (logs, plots, checkpoints/) goes to --out. "
    f"Tasks (--task.name) and their options (--task.options.KEY): {_task_options()}.",
    argv=train_argv,
)
def train(args: Train) -> dict[str, Any]:
    """Claim the run directory of a validated run config, then train (or resume)."""
    from moekit.viz import plot_training  # matplotlib: loaded by the commands that draw

    cfg = args.run
    resume = cfg.out if args.resume == "auto" else args.resume
    # before the Trainer: under torchrun every rank checks the folder before any rank can
    # write to it (they meet first when the Trainer joins the process group); rank 0 moves
    is_main = os.environ.get("RANK", "0") == "0"
    with contextlib.ExitStack() as held:
        if is_main:
            held.enter_context(run_lock(cfg.out))
        moved = claim_run_dir(cfg.out, resume, args.overwrite, is_main)
        if moved is not None:
            print(f"moved the previous run in {cfg.out} to {moved}", file=sys.stderr)
            held.enter_context(run_lock(cfg.out))  # the lock moved with the old run
        trainer = Trainer(cfg, plotter=plot_training)
        try:
            summary = trainer.fit(resume=resume)
        finally:
            trainer.close()
    if not trainer.is_main:  # expert parallel: rank 0 reports
        return summary
    if summary["stopped_by_signal"]:
        print(
            f"stopped by signal {summary['stopped_by_signal']} at step {summary['step']}; "
            f"resume with --resume {cfg.out}"
        )
    print(json.dumps({"step": summary["step"], **summary["val"]}))
    print(f"checkpoint: {summary['checkpoint']}")
    for path in summary["plots"]:
        print(f"plot: {path}")
    return summary


@dataclass
class Eval:
    path: str = argument("checkpoint or run directory; `latest`: the newest run under moekit-out")
    batch_size: int = option(64, "validation batch size")


@command("eval", Eval, help="Evaluate a checkpoint (or a run dir's best one) on its task.")
def evaluate_command(args: Eval) -> dict[str, Any]:
    return evaluate(resolve_run(args.path), args.batch_size)


def evaluate(path: str, batch_size: int = 64) -> dict[str, Any]:
    """Metrics of a checkpoint on its task's validation set, printed as one JSON line."""
    if batch_size < 1:
        raise ValueError(f"--batch-size={batch_size} must be >= 1")
    ckpt = pick_checkpoint(path)
    cfg = run_config_of(ckpt)
    model = load_files(ckpt)
    task = build_task(cfg.task, cfg.seed)
    record = evaluate_model(model, task, task.val_batches(batch_size))
    result = {
        "checkpoint": str(ckpt),
        "task": task.name,
        **{k: v for k, v in record.items() if k != "routing"},
    }
    print(json.dumps(result))
    bad = [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        print(f"moekit: warning: {', '.join(bad)} not finite", file=sys.stderr)
    return result


def _parse_vectors(prompt: str | None, dim: int) -> torch.Tensor:
    """'a,b,c;d,e,f' -> [1, S, dim] float32; a text or malformed prompt is refused."""
    form = f"this is a continuous model (d_in={dim}): give --prompt values such as " + (
        "'0.1,0.2,0.3'" if dim == 1 else "'" + ";".join([",".join(["0.1"] * dim)] * 2) + "'"
    )
    if prompt is None or not prompt.strip():
        raise ValueError(f"--prompt: {form}")
    try:
        rows = [[float(v) for v in row.split(",")] for row in prompt.split(";") if row.strip()]
    except ValueError:
        raise ValueError(f"--prompt={prompt!r} is not numbers: {form}") from None
    if dim == 1 and len(rows) == 1:
        rows = [[v] for v in rows[0]]
    if any(len(r) != dim for r in rows):
        raise ValueError(f"--prompt needs vectors of {dim} values separated by ';'")
    if not all(math.isfinite(v) for r in rows for v in r):
        raise ValueError("--prompt holds NaN or infinity")
    return torch.tensor(rows)[None]  # [1, S, dim]


def _prompt_text(prompt: str | None) -> str:
    """The prompt (default 'def '), refused when empty or not UTF-8."""
    text = DEFAULT_TEXT_PROMPT if prompt is None else prompt
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as lone surrogates
        raise ValueError("--prompt is not valid UTF-8 text") from None
    if not text:
        raise ValueError("--prompt is empty: give at least one character")
    return text


def _check_prompt_ids(ids: torch.Tensor, model: Transformer, unit: str) -> torch.Tensor:
    """ids [S] that the model can read: at least one, none past the vocab, S <= max_seq_len."""
    vocab, window = model.cfg.vocab_size or 0, model.cfg.max_seq_len
    if ids.numel() == 0:
        raise ValueError("--prompt is empty once tokenized: give some text")
    if ids.numel() > window:
        raise ValueError(
            f"--prompt is {ids.numel()} {unit}s; this model reads at most max_seq_len={window}"
        )
    if int(ids.max()) >= vocab:
        why = "does not read UTF-8 bytes" if unit == "byte" else "does not match its tokenizer"
        raise ValueError(
            f"--prompt: {unit} {int(ids.max())} is outside vocab_size={vocab}; this model {why}"
        )
    return ids


def _text_prompt(prompt: str | None, model: Transformer) -> torch.Tensor:
    """The prompt's UTF-8 bytes [S] as token ids; empty, undecodable or off-vocab refused."""
    from moekit.tasks.text import TextTask

    return _check_prompt_ids(TextTask.encode(_prompt_text(prompt)), model, "byte")


def _tokenizer_codec(model: Transformer, ckpt: Any) -> Any:
    """The tokenizer carried by the checkpoint (as `moekit serve` reads it), else None."""
    from moekit.model.codec import ByteCodec, load_codec

    codec = load_codec(model, ckpt)
    return None if codec is None or isinstance(codec, ByteCodec) else codec


def _token_text(codec: Any, prompt_ids: list[int], new_ids: list[int]) -> str:
    """Prompt and continuation as text, the continuation cut after its first end-of-sequence id.

    Decoded piece by piece as the server streams it, so both print the same text.
    """
    stop = next((i + 1 for i, t in enumerate(new_ids) if t in codec.eos_ids), len(new_ids))
    decoder = codec.decoder()
    return "".join(decoder.feed(t) for t in prompt_ids + new_ids[:stop]) + decoder.flush()


@dataclass
class Generate:
    path: str = argument("checkpoint or run directory; `latest`: the newest run under moekit-out")
    prompt: str | None = option(
        None,
        "text (default 'def '); continuous models need values 'a,b,c' (vectors split by ';')",
    )
    max_new: int = option(200, "positions to generate")
    temperature: float = option(0.8, "0 = greedy")
    top_k: int | None = option(None, "sample among the k best")
    top_p: float | None = option(0.95, "nucleus probability mass")
    samples: int = option(1, "number of samples")
    seed: int = option(0, "sampling seed")
    prompt_ids: str | None = option(
        None, "token ids '1,2,3' instead of --prompt text; prints ids (no tokenizer needed)"
    )


def _parse_ids(text: str) -> torch.Tensor:
    """'1,2,3' -> [S] token ids; anything else refused naming --prompt-ids."""
    try:
        ids = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"--prompt-ids={text!r} is not integers such as '1,2,3'") from None
    if any(i < 0 for i in ids):
        raise ValueError(f"--prompt-ids={text!r}: token ids are >= 0")
    return torch.tensor(ids, dtype=torch.long)


def _ids_stream() -> Callable[[Any], None]:
    """on_step for --prompt-ids: each new id as it comes, after the prompt's."""
    show = _printer("")

    def step(nxt_B1: torch.Tensor) -> None:
        show(f",{int(nxt_B1[0, 0])}")

    return step


def _no_tokenizer(ckpt: Any, vocab: int) -> ValueError:
    return ValueError(
        f"{ckpt} has no tokenizer and its vocab_size={vocab} is not UTF-8 bytes, so text "
        "cannot be encoded: copy the original model's tokenizer.json and tokenizer_config.json "
        "beside its model.safetensors, or give token ids with --prompt-ids 1,2,3"
    )


def check_generate_options(args: Generate) -> None:
    """Sampling options by the server's rules (`SAMPLING_BOUNDS`), plus --samples >= 1."""
    values = {
        "max_new_tokens": args.max_new,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
    }
    check_sampling(values, OPTION_NAMES)
    if args.samples < 1:
        raise ValueError(f"--samples={args.samples} must be >= 1")


def capped_max_new(max_new: int, prompt_len: int, window: int) -> int:
    """--max-new cut to what fits the context after the prompt, said in one line on stderr."""
    room = window - prompt_len
    if room < 1:
        raise ValueError(
            f"--prompt is {prompt_len} positions: with max_seq_len={window} nothing is left "
            "to generate; give a shorter prompt"
        )
    if max_new > room:
        print(
            f"moekit generate: --max-new {max_new} capped at {room}: the prompt ({prompt_len}) "
            f"and the continuation fit max_seq_len={window}",
            file=sys.stderr,
        )
    return min(max_new, room)


def _printer(first: str) -> Callable[[str], None]:
    """print(piece) without a newline, flushed at once: a sample shown as it is generated."""
    print(first, end="", flush=True)
    return lambda piece: print(piece, end="", flush=True)


def _text_stream(codec: Any, prompt_ids: list[int], max_new: int) -> Callable[[Any], None]:
    """on_step for one text sample: each token's text once it is whole; none after an EOS
    (the text `_token_text` gives, piece by piece)."""
    decoder = codec.decoder()
    show = _printer("".join(decoder.feed(t) for t in prompt_ids))
    left, ended = max_new, False

    def step(nxt_B1: torch.Tensor) -> None:
        nonlocal left, ended
        left -= 1
        if ended:
            return
        token = int(nxt_B1[0, 0])
        show(decoder.feed(token))
        ended = token in codec.eos_ids
        if ended or left == 0:
            show(decoder.flush())

    return step


def _rows_stream() -> Callable[[Any], None]:
    """on_step for a continuous rollout: each row 'a,b,c' as it comes, rows split by ';'."""
    show, sep = _printer(""), ""

    def step(nxt_B1D: torch.Tensor) -> None:
        nonlocal sep
        show(sep + _row(nxt_B1D[0, 0].tolist()))
        sep = ";"

    return step


def _row(values: list[float]) -> str:
    return ",".join(f"{v:.4f}" for v in values)


@command("generate", Generate, help="Sample from a checkpoint: text, or a continuous rollout.")
def generate(args: Generate) -> list[str]:
    """Print samples: text for token models (the checkpoint's tokenizer, else UTF-8 bytes),
    rolled-out values for continuous ones. One sample is printed as it is generated."""
    check_generate_options(args)
    ckpt = pick_checkpoint(resolve_run(args.path))
    model = load_files(ckpt)
    gen = torch.Generator().manual_seed(args.seed)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    outputs = []
    window = model.cfg.max_seq_len
    stream = args.samples == 1 or not model.is_lm  # a rollout is one sample
    if model.is_lm:
        from moekit.model.codec import ByteCodec
        from moekit.tasks.text import TextTask

        codec = _tokenizer_codec(model, ckpt)
        if args.prompt_ids is not None:
            if args.prompt is not None:
                raise ValueError("give --prompt (text) or --prompt-ids (token ids), not both")
            return _generate_ids(args, model, _parse_ids(args.prompt_ids), gen, sampling)
        if codec is None and (model.cfg.vocab_size or 0) > 256:
            raise _no_tokenizer(ckpt, model.cfg.vocab_size)
        if codec is None:
            ids = _text_prompt(args.prompt, model)
        else:
            ids = torch.tensor(codec.encode(_prompt_text(args.prompt)), dtype=torch.long)
            ids = _check_prompt_ids(ids, model, "token")
        prompt = ids[None].repeat(args.samples, 1)  # [N, S]
        S = prompt.shape[1]
        max_new = capped_max_new(args.max_new, S, window)
        on_step = _text_stream(codec or ByteCodec(), ids.tolist(), max_new) if stream else None
        seq = model.generate(prompt, max_new, generator=gen, on_step=on_step, **sampling)
        if codec is None:
            outputs = [TextTask.decode(s) for s in seq]
        else:
            outputs = [_token_text(codec, s[:S].tolist(), s[S:].tolist()) for s in seq]
    else:
        prompt = _parse_vectors(args.prompt, model.cfg.d_in)
        if model.cfg.d_out != model.cfg.d_in:
            raise ValueError(
                f"{ckpt} predicts d_out={model.cfg.d_out} values from d_in={model.cfg.d_in}: "
                "it cannot roll out"
            )
        max_new = capped_max_new(args.max_new, prompt.shape[1], window)
        seq = model.generate(prompt, max_new, on_step=_rows_stream())[0, prompt.shape[1] :]
        outputs = [";".join(_row(row) for row in seq.tolist())]
    return _print_samples(outputs, stream)


def _generate_ids(
    args: Generate, model: Transformer, ids: torch.Tensor, gen: Any, sampling: dict[str, Any]
) -> list[str]:
    """Token ids in, token ids out ('1,2,3' per sample, the prompt's first)."""
    ids = _check_prompt_ids(ids, model, "token")
    prompt = ids[None].repeat(args.samples, 1)  # [N, S]
    max_new = capped_max_new(args.max_new, prompt.shape[1], model.cfg.max_seq_len)
    stream = args.samples == 1
    if stream:
        print(",".join(str(i) for i in ids.tolist()), end="", flush=True)
    on_step = _ids_stream() if stream else None
    seq = model.generate(prompt, max_new, generator=gen, on_step=on_step, **sampling)
    return _print_samples([",".join(str(i) for i in s.tolist()) for s in seq], stream)


def _print_samples(outputs: list[str], streamed: bool) -> list[str]:
    """End a streamed sample's line, or print the samples (headed when several)."""
    if streamed:
        print()
        return outputs
    for i, text in enumerate(outputs):
        print(f"--- sample {i} ---\n{text}" if len(outputs) > 1 else text)
    return outputs


@dataclass
class Plot:
    run_dir: str = argument(
        "run directory (holds metrics.jsonl); `latest`: the newest under moekit-out"
    )


@command(
    "plot",
    Plot,
    help="Redraw a run's dashboard and specialisation plots, and its task's own analysis plots "
    "from the best checkpoint.",
)
def plot(args: Plot) -> None:
    from moekit.viz import plot_run, plot_task

    run_dir = resolve_run(args.run_dir)
    for path in plot_run(run_dir) + plot_task(run_dir):
        print(path)
