import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from tests.tiny import tiny_model

from moekit.errors import CheckpointError
from moekit.model import load
from moekit.model.manifest import MANIFEST_FILE, verify_manifest
from moekit.model.store import list_checkpoints, pick_checkpoint, prune_checkpoints
from moekit.train import checkpoint as ckpt_mod
from moekit.train import save_checkpoint
from moekit.train.checkpoint import Checkpointer, load_trainer_state
from moekit.train.parallelism import SingleProcess


def _model(seed=0):
    return tiny_model(seed)


def test_failed_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    good = _model(0)
    save_checkpoint(tmp_path, good, {"step": 1}, step=1)

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", explode)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, _model(1), {"step": 2}, step=2)
    assert [c["step"] for c in list_checkpoints(tmp_path)] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000001"]
    x = torch.randint(0, 11, (1, 5))
    assert torch.equal(load(pick_checkpoint(tmp_path, "latest"))(x).out, good.eval()(x).out)


def test_rewriting_a_step_replaces_it_whole(tmp_path):
    save_checkpoint(tmp_path, _model(0), {"step": 3}, step=3, metric=2.0)
    save_checkpoint(tmp_path, _model(1), {"step": 3}, step=3, metric=1.0)
    (only,) = list_checkpoints(tmp_path)
    assert only["metric"] == 1.0
    assert torch.equal(load(only["path"]).embed.weight, _model(1).embed.weight)


def test_killed_writer_never_leaves_a_broken_checkpoint(tmp_path):
    script = textwrap.dedent(
        f"""
        import torch
        from moekit.model import ModelConfig, Transformer
        from moekit.train import save_checkpoint
        cfg = ModelConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=2, d_ff=256)
        model = Transformer(cfg)
        state = {{"blob": torch.randn(200_000)}}
        step = 0
        while True:
            step += 1
            save_checkpoint({str(tmp_path)!r}, model, state, step=step)
            print(step, flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for _ in range(3):  # let a few checkpoints complete, then kill mid-stream
        proc.stdout.readline()
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpts = list_checkpoints(tmp_path)
    assert len(ckpts) >= 3
    for c in ckpts:
        load(c["path"])
        assert torch.load(c["path"] / "trainer_state.pt")["blob"].shape == (200_000,)


def test_prune_keeps_best_and_latest(tmp_path):
    model = _model()
    metrics = {1: 5.0, 2: 1.0, 3: 4.0, 4: 0.5, 5: 3.0, 6: None}
    for step, metric in metrics.items():
        save_checkpoint(tmp_path, model, None, step=step, metric=metric)
    prune_checkpoints(tmp_path, keep_last=2, keep_best=2)
    assert [c["step"] for c in list_checkpoints(tmp_path)] == [2, 4, 5, 6]
    assert pick_checkpoint(tmp_path).name == "step-0000004"
    assert pick_checkpoint(tmp_path, "latest").name == "step-0000006"


def test_prune_never_deletes_the_newest_intact_checkpoint(tmp_path):
    model = _model()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model, None, step=step)
    damaged = list_checkpoints(tmp_path)[-1]["path"] / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    prune_checkpoints(tmp_path, keep_last=1, keep_best=0)  # the intact one found by manifest
    assert [c["step"] for c in list_checkpoints(tmp_path)] == [2, 3]
    assert pick_checkpoint(tmp_path, "latest").name == "step-0000002"
    ckpts = Checkpointer(
        tmp_path, {}, keep_last=1, keep_best=0, parallel=SingleProcess(torch.device("cpu"))
    )
    ckpts.save(model, {"step": 2}, step=2, metric=None)  # written again: known intact
    assert [c["step"] for c in list_checkpoints(tmp_path)] == [2, 3]


@pytest.mark.parametrize(
    "content", [b"not a checkpoint", None], ids=["garbage", "a list, not a state"]
)
def test_unreadable_or_foreign_state_is_refused_by_name(tmp_path, content):
    path = tmp_path / "trainer_state.pt"
    if content is None:
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=r"trainer_state\.pt: refused"):
        load_trainer_state(path)


def test_manifest_vouches_for_every_file_of_a_checkpoint(tmp_path):
    path = save_checkpoint(tmp_path, _model(), {"step": 1}, step=1, texts={"run.json": "{}"})
    listed = json.loads((path / MANIFEST_FILE).read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in path.iterdir() if p.name != MANIFEST_FILE)
    assert verify_manifest(path)
    (path / "run.json").write_text("[]")  # same size, other bytes
    with pytest.raises(CheckpointError, match=r"run\.json: damaged, its sha256"):
        verify_manifest(path)


def test_a_checkpoint_written_before_manifests_still_loads(tmp_path):
    path = save_checkpoint(tmp_path, _model(0), {"step": 1}, step=1)
    (path / MANIFEST_FILE).unlink()
    assert not verify_manifest(path)
    x = torch.randint(0, 11, (1, 5))
    assert torch.equal(load(path)(x).out, _model(0).eval()(x).out)


def test_pick_skips_a_damaged_checkpoint_in_one_line(tmp_path, caplog):
    for step, metric in ((1, 2.0), (2, 1.0), (3, None)):
        save_checkpoint(tmp_path, _model(step), {"step": step}, step=step, metric=metric)
    weights = tmp_path / "step-0000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    assert pick_checkpoint(tmp_path).name == "step-0000001"  # next best by metric
    assert pick_checkpoint(tmp_path, "latest").name == "step-0000003"
    (message,) = {r.getMessage() for r in caplog.records}
    assert f"{weights}: damaged" in message and "\n" not in message
    with pytest.raises(CheckpointError, match=r"step-0000002/model\.safetensors: damaged"):
        pick_checkpoint(tmp_path / "step-0000002")  # named directly: nothing to fall back to


def test_unreadable_meta_is_listed_by_its_directory_name(tmp_path):
    save_checkpoint(tmp_path, _model(), None, step=5, metric=1.0)
    (tmp_path / "step-0000005" / "meta.json").write_text("{not json")
    assert [(c["step"], c["metric"]) for c in list_checkpoints(tmp_path)] == [(5, None)]


def test_restore_falls_back_past_an_unreadable_checkpoint_without_manifest(tmp_path, caplog):
    for step in (1, 2):
        model = _model(step)
        state = {"step": step, "optimizer": {}, "scaler": {}, "rng": {}}
        path = save_checkpoint(tmp_path, model, state, step=step)
        (path / MANIFEST_FILE).unlink()
    weights = tmp_path / "step-0000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    target = _model(9)
    restorer = Checkpointer(tmp_path, {}, 2, 0, SingleProcess(torch.device("cpu")))
    ckpt, state = restorer.restore(tmp_path, target, torch.device("cpu"))
    assert ckpt.name == "step-0000001" and state["step"] == 1
    assert torch.equal(target.embed.weight, _model(1).embed.weight)
    assert str(weights) in caplog.text


def test_weights_of_another_shape_name_the_parameter_and_both_shapes(tmp_path):
    state = {"step": 1, "optimizer": {}, "scaler": {}, "rng": {}}
    path = save_checkpoint(tmp_path, _model(), state, step=1)
    restorer = Checkpointer(tmp_path, {}, 2, 0, SingleProcess(torch.device("cpu")))
    wider = tiny_model(0, d_ff=64)
    shapes = r"blocks\.0\.ffn\.w1 has shape \[1, 32, 96\] in the file, \[1, 32, 128\] in the"
    with pytest.raises(ValueError, match=shapes):
        restorer.restore(path, wider, torch.device("cpu"))
