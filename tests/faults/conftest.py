"""Fault injection: a tiny trained run to damage, and the `moekit` command run in-process.

Every test asserts the exact exit code (or HTTP status) and that no traceback is printed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tests.tiny import tiny_model

from moekit.cli import main
from moekit.model.store import RUN_FILE, list_checkpoints
from moekit.train.checkpoint import save_checkpoint
from moekit.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "signals-tiny.yaml")
# signals-tiny made tiny: a few seconds per run on one core
TINY = [
    "--model.d_model=16",
    "--model.n_heads=2",
    "--model.d_ff=32",
    "--model.max_seq_len=16",
    "--model.moe.d_hidden=16",
    "--model.moe.n_experts=4",
    "--task.seq_len=16",
    "--task.val_sequences=16",
    "--train.batch_size=8",
    "--train.warmup_steps=2",
    "--train.eval_interval=2",
    "--train.keep_last=3",
    "--train.keep_best=0",
    "--train.plot_interval=0",
    "--train.live=off",
    "--train.threads=1",
]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`moekit ARGV` in this process: (exit code, stdout, stderr), never with a traceback."""
    try:
        code = main(list(argv))
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def one_error(err: str) -> str:
    """The single `moekit: error: ...` line a refused command prints (nothing else)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moekit: error: "), err
    return lines[0]


def train_args(out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", CONFIG, *TINY, f"--train.steps={steps}", f"--out={out}", *extra]


def _no_plots(trainer: Trainer, final: bool) -> list[Path]:
    return []


@pytest.fixture(autouse=True)
def skip_plots(monkeypatch):
    """Runs here draw nothing: the plots cost seconds and are not what these tests check."""
    monkeypatch.setattr(Trainer, "plot", _no_plots)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A finished 6-step signals run with checkpoints at steps 2, 4 and 6 (do not modify)."""
    out = tmp_path_factory.mktemp("faults") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "plot", _no_plots)
        assert main(train_args(out, 6)) == 0
    assert [c["step"] for c in list_checkpoints(out / "checkpoints")] == [2, 4, 6]
    return out


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A copy of `trained_run` this test may damage."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


@pytest.fixture(scope="session")
def text_ckpt(tmp_path_factory) -> Path:
    """A byte-level text model's checkpoint (vocab 256), as training writes one."""
    root = tmp_path_factory.mktemp("text")
    model = tiny_model(0, vocab_size=256)
    state = {"step": 1, "optimizer": {}, "scaler": {}, "rng": {"seed": torch.tensor(0)}}
    return save_checkpoint(root, model, state, step=1, texts={RUN_FILE: "{}\n"})


def newest(run: Path) -> Path:
    return list_checkpoints(run / "checkpoints")[-1]["path"]
