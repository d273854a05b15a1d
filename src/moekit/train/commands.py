"""What `moekit train`, `moekit eval` and `moekit generate` do, given parsed arguments."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import torch

from moekit.model import load
from moekit.tasks import build_task
from moekit.train.checkpoint import RUN_FILE, pick_checkpoint
from moekit.train.config import RunConfig
from moekit.train.metrics import evaluate_model
from moekit.train.trainer import Trainer


def _fail(message: str) -> None:
    print(f"moekit: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _plain(value: Any) -> Any:
    """Parsed values -> plain dicts, so every dataclass is (re)built and validated here."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return value


def train(args: Any) -> dict[str, Any]:
    """Validate the whole run config, then train (or resume) and print where things went."""
    try:
        cfg = RunConfig(
            **{k: _plain(args[k]) for k in ("task", "model", "train", "parallel", "seed", "out")}
        )
        trainer = Trainer(cfg)
    except ValueError as err:
        _fail(str(err))
    resume = cfg.out if args.resume == "auto" else args.resume
    try:
        summary = trainer.fit(resume=resume)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
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
    """The run config saved beside a checkpoint."""
    ckpt = pick_checkpoint(path)
    return RunConfig(**json.loads((ckpt / RUN_FILE).read_text()))


def evaluate(path: str, batch_size: int = 64) -> dict[str, Any]:
    """Metrics of a checkpoint on its task's validation set, printed as one JSON line."""
    try:
        ckpt = pick_checkpoint(path)
    except FileNotFoundError as err:
        _fail(str(err))
    cfg = run_config_of(ckpt)
    model = load(ckpt)
    task = build_task(cfg.task, cfg.seed)
    record = evaluate_model(model, task, task.val_batches(batch_size))
    result = {
        "checkpoint": str(ckpt),
        "task": task.name,
        **{k: v for k, v in record.items() if k != "routing"},
    }
    print(json.dumps(result))
    return result


def _parse_vectors(prompt: str, dim: int) -> torch.Tensor:
    rows = [[float(v) for v in row.split(",")] for row in prompt.split(";") if row.strip()]
    if dim == 1 and len(rows) == 1:
        rows = [[v] for v in rows[0]]
    if any(len(r) != dim for r in rows):
        _fail(f"--prompt needs vectors of {dim} values separated by ';'")
    return torch.tensor(rows)[None]  # [1, S, dim]


def generate(args: Any) -> list[str]:
    """Print samples: decoded bytes for text models, rolled-out values for continuous ones."""
    try:
        model = load(args.path)
    except FileNotFoundError as err:
        _fail(str(err))
    gen = torch.Generator().manual_seed(args.seed)
    outputs = []
    if model.is_lm:
        from moekit.tasks.text import TextTask

        prompt = TextTask.encode(args.prompt)[None].repeat(args.samples, 1)  # [N, S]
        seq = model.generate(
            prompt,
            args.max_new,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=gen,
        )
        outputs = [TextTask.decode(s) for s in seq]
    else:
        prompt = _parse_vectors(args.prompt, model.cfg.d_in)
        seq = model.generate(prompt, args.max_new)[0, prompt.shape[1] :]
        outputs = [";".join(",".join(f"{v:.4f}" for v in row) for row in seq.tolist())]
    for i, text in enumerate(outputs):
        print(f"--- sample {i} ---\n{text}" if len(outputs) > 1 else text)
    return outputs
