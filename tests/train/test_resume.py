import json
import signal

import pytest
import torch

from moekit.model import load
from moekit.model.manifest import write_manifest
from moekit.model.store import RUN_FILE
from moekit.train import Trainer, list_checkpoints, read_log
from moekit.train.checkpoint import STATE_FILE, load_trainer_state


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


class _RunsCode:
    """Unpickling this calls open(path, "w"): the marker file appears if code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_refuses_a_state_file_that_would_run_code(tmp_path, make_run):
    Trainer(make_run(tmp_path / "run", steps=4)).fit()
    ckpt = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]["path"]
    marker = tmp_path / "code-ran"
    torch.save({"step": 4, "rng": _RunsCode(marker)}, ckpt / STATE_FILE)
    write_manifest(ckpt)  # planted with a matching manifest: only the loader stands in the way

    resumed = Trainer(make_run(tmp_path / "run", steps=8))
    with pytest.raises(ValueError, match=rf"{STATE_FILE}: refused.*open"):
        resumed.fit(resume=tmp_path / "run")
    assert not marker.exists() and resumed.step == 0
    torch.load(ckpt / STATE_FILE, weights_only=False)  # what the old loader did
    assert marker.exists()  # so the file really carried code


def test_trainer_state_holds_only_tensors_and_plain_values(tmp_path, make_run):
    Trainer(make_run(tmp_path, steps=4)).fit()
    ckpt = list_checkpoints(tmp_path / "checkpoints")[-1]["path"]
    state = load_trainer_state(ckpt / STATE_FILE)  # weights_only=True
    assert state["step"] == 4 and state["optimizer"]["state"]
    assert isinstance(state["rng"]["numpy"]["key"], torch.Tensor)
    assert json.loads((ckpt / RUN_FILE).read_text())["seed"] == 0
