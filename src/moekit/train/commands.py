"""What `moekit train`, `moekit eval` and `moekit generate` do, given parsed arguments.

A user's mistake raises ValueError (or FileNotFoundError) naming the option or file; the
`moekit` command prints it as one line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Any

import torch

from moekit.errors import CheckpointError
from moekit.model.io import load_files
from moekit.model.sampling_rules import check_sampling
from moekit.model.transformer import Transformer
from moekit.tasks import build_task
from moekit.train.checkpoint import RUN_FILE, pick_checkpoint
from moekit.train.config import RunConfig
from moekit.train.metrics import evaluate_model
from moekit.train.rundir import claim_run_dir
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


def _plain(value: Any) -> Any:
    """Parsed values -> plain dicts, so every dataclass is (re)built and validated here."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return value


def train(args: Any) -> dict[str, Any]:
    """Validate the whole run config, claim the run directory, then train (or resume)."""
    cfg = RunConfig(
        **{k: _plain(args[k]) for k in ("task", "model", "train", "parallel", "seed", "out")}
    )
    resume = cfg.out if args.resume == "auto" else args.resume
    # before the Trainer: under torchrun every rank checks the folder before any rank can
    # write to it (they meet first when the Trainer joins the process group); rank 0 moves
    is_main = os.environ.get("RANK", "0") == "0"
    moved = claim_run_dir(cfg.out, resume, bool(args.get("overwrite")), is_main)
    if moved is not None:
        print(f"moved the previous run in {cfg.out} to {moved}", file=sys.stderr)
    trainer = Trainer(cfg)
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


def run_config_of(path: Any) -> RunConfig:
    """The run config saved beside a checkpoint; a missing or broken one is named."""
    file = pick_checkpoint(path) / RUN_FILE
    try:
        return RunConfig.from_dict(json.loads(file.read_bytes()))
    except FileNotFoundError:
        raise CheckpointError(
            f"{file}: missing (eval needs a checkpoint written by training)"
        ) from None
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: not a run config ({err})") from None


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
    from moekit.serve.text import ByteCodec, load_codec

    codec = load_codec(model, ckpt)
    return None if codec is None or isinstance(codec, ByteCodec) else codec


def _token_text(codec: Any, prompt_ids: list[int], new_ids: list[int]) -> str:
    """Prompt and continuation as text, the continuation cut after its first end-of-sequence id.

    Decoded piece by piece as the server streams it, so both print the same text.
    """
    stop = next((i + 1 for i, t in enumerate(new_ids) if t in codec.eos_ids), len(new_ids))
    decoder = codec.decoder()
    return "".join(decoder.feed(t) for t in prompt_ids + new_ids[:stop]) + decoder.flush()


def check_generate_options(args: Any) -> None:
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


def generate(args: Any) -> list[str]:
    """Print samples: text for token models (the checkpoint's tokenizer, else UTF-8 bytes),
    rolled-out values for continuous ones."""
    check_generate_options(args)
    ckpt = pick_checkpoint(args.path)
    model = load_files(ckpt)
    gen = torch.Generator().manual_seed(args.seed)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    outputs = []
    if model.is_lm:
        from moekit.tasks.text import TextTask

        codec = _tokenizer_codec(model, ckpt)
        if codec is None:
            ids = _text_prompt(args.prompt, model)
        else:
            ids = torch.tensor(codec.encode(_prompt_text(args.prompt)), dtype=torch.long)
            ids = _check_prompt_ids(ids, model, "token")
        prompt = ids[None].repeat(args.samples, 1)  # [N, S]
        seq = model.generate(prompt, args.max_new, generator=gen, **sampling)
        if codec is None:
            outputs = [TextTask.decode(s) for s in seq]
        else:
            S = prompt.shape[1]
            outputs = [_token_text(codec, s[:S].tolist(), s[S:].tolist()) for s in seq]
    else:
        prompt = _parse_vectors(args.prompt, model.cfg.d_in)
        if model.cfg.d_out != model.cfg.d_in:
            raise ValueError(
                f"{ckpt} predicts d_out={model.cfg.d_out} values from d_in={model.cfg.d_in}: "
                "it cannot roll out"
            )
        seq = model.generate(prompt, args.max_new)[0, prompt.shape[1] :]
        outputs = [";".join(",".join(f"{v:.4f}" for v in row) for row in seq.tolist())]
    for i, text in enumerate(outputs):
        print(f"--- sample {i} ---\n{text}" if len(outputs) > 1 else text)
    return outputs
