import signal

import torch

from moekit.model import load
from moekit.train import Trainer, list_checkpoints, read_log


def _losses(run_dir):
    return [
        (r["step"], r["loss"], r["grad_norm"]) for r in read_log(run_dir) if r["kind"] == "train"
    ]


def test_resume_after_signal_is_bitwise_identical(tmp_path, make_run, monkeypatch):
    full = Trainer(make_run(tmp_path / "full"))
    full.fit()

    cut = Trainer(make_run(tmp_path / "cut"))
    original = cut.train_step

    def step_then_sigterm():
        record = original()
        if cut.step == 6:  # 7th step in flight: SIGTERM arrives
            signal.raise_signal(signal.SIGTERM)
        return record

    monkeypatch.setattr(cut, "train_step", step_then_sigterm)
    summary = cut.fit()
    assert summary["stopped_by_signal"] == signal.SIGTERM
    assert summary["step"] == 7
    assert [c["step"] for c in list_checkpoints(tmp_path / "cut" / "checkpoints")][-1] == 7

    resumed = Trainer(make_run(tmp_path / "cut"))
    resumed.fit(resume=tmp_path / "cut")
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")
    done, again = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(done[k], again[k]) for k in done)
    x = torch.randn(2, 16, 1)
    assert torch.equal(
        load(tmp_path / "full").forward(x).out, load(tmp_path / "cut").forward(x).out
    )
