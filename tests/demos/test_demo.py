"""`moekit demo`: a Ctrl-C stops it with one line, no dense run after a cut-short MoE run."""

import os
import signal

import pytest

from moekit.cli import main
from moekit.train.trainer import Trainer


@pytest.mark.parametrize("presses", [1, 2], ids=["ctrl-c", "ctrl-c twice"])
def test_ctrl_c_reports_interrupted_and_trains_nothing_more(tmp_path, monkeypatch, capsys, presses):
    real = Trainer.train_step

    def train_step(self):
        if self.step == 2:  # during step 3 of the MoE run
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    assert main(["demo", "--out", str(tmp_path), "--steps", "8"]) == 130
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert err.strip().splitlines() == [
        f"moekit: interrupted: MoE 8x top-2 stopped at step 3 of 8 (checkpoint "
        f"{tmp_path / 'moe' / 'checkpoints' / 'step-0000003'}); the demo compares finished "
        "runs only"
    ]
    assert "val MSE" not in out and not (tmp_path / "dense").exists()
