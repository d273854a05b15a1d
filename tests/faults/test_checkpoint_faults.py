"""Damaged checkpoints and reused run folders: refused in one line, or the previous checkpoint
used; never a traceback, never a silently mixed run."""

import json
import logging

import pytest
from tests.faults.conftest import newest, one_error, run_cli, train_args

from moekit.model.manifest import MANIFEST_FILE
from moekit.model.store import list_checkpoints

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def _steps(run):
    return [c["step"] for c in list_checkpoints(run / "checkpoints")]


# data loss and silent wrong results ------------------------------------------------------------
def test_training_into_another_runs_folder_is_refused(run_copy, capsys):
    log_before = (run_copy / "metrics.jsonl").read_bytes()
    code, _, err = run_cli(capsys, *train_args(run_copy, 2))
    line = one_error(err)
    assert code == 2 and "--resume" in line and "--overwrite" in line and "step 6" in line
    assert _steps(run_copy) == [2, 4, 6]
    assert (run_copy / "metrics.jsonl").read_bytes() == log_before


def test_overwrite_moves_the_old_run_aside_and_deletes_nothing(run_copy, capsys):
    code, out, err = run_cli(capsys, *train_args(run_copy, 2, "--overwrite"))
    assert code == 0 and "moved the previous run" in err
    (old,) = run_copy.parent.glob("run.old-*")
    assert _steps(old) == [2, 4, 6] and _steps(run_copy) == [2]
    assert json.loads(out.splitlines()[0])["step"] == 2
    code, out, _ = run_cli(capsys, "eval", str(run_copy))
    assert code == 0 and json.loads(out)["checkpoint"].startswith(str(run_copy / "checkpoints"))


def test_bit_flipped_weights_are_refused_naming_the_file(run_copy, capsys, caplog):
    ckpt = newest(run_copy)
    data = bytearray((ckpt / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0x40  # one bit of one weight
    (ckpt / WEIGHTS).write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "eval", str(ckpt))
    assert code == 2 and f"{ckpt / WEIGHTS}: damaged" in one_error(err)
    code, out, _ = run_cli(capsys, "eval", str(run_copy))  # the run's next-best one instead
    assert code == 0 and json.loads(out)["checkpoint"] != str(ckpt)
    assert caplog.records and str(ckpt / WEIGHTS) in caplog.text


def test_resume_falls_back_past_a_truncated_newest_checkpoint(run_copy, capsys, caplog):
    ckpt = newest(run_copy)
    (ckpt / WEIGHTS).write_bytes((ckpt / WEIGHTS).read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        code, out, _ = run_cli(capsys, *train_args(run_copy, 8, "--resume"))
    assert code == 0 and json.loads(out.splitlines()[0])["step"] == 8
    (warning,) = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert str(ckpt / WEIGHTS) in warning and "\n" not in warning
    records = [json.loads(line) for line in (run_copy / "metrics.jsonl").open()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == list(range(1, 9))  # resumed at 4: steps 5 and 6 logged once


def test_pruning_after_a_resume_past_a_damaged_checkpoint_keeps_the_good_one(run_copy, capsys):
    ckpt = newest(run_copy)  # step 6, damaged: the resume starts from step 4
    (ckpt / WEIGHTS).write_bytes((ckpt / WEIGHTS).read_bytes()[:1000])
    code, out, _ = run_cli(capsys, *train_args(run_copy, 5, "--resume", "--train.keep_last=1"))
    assert code == 0 and json.loads(out.splitlines()[0])["step"] == 5
    assert 5 in _steps(run_copy)  # keep_last=1 alone would keep only the damaged step 6
    code, out, _ = run_cli(capsys, *train_args(run_copy, 6, "--resume"))
    assert code == 0 and json.loads(out.splitlines()[0])["step"] == 6


def test_resume_below_the_checkpoint_step_is_refused(run_copy, capsys):
    code, _, err = run_cli(capsys, *train_args(run_copy, 4, "--resume"))
    assert code == 2 and "already at step 6" in one_error(err)


# one line where a traceback was ----------------------------------------------------------------
def _damage(ckpt, kind):
    """Damage a checkpoint the way a full disk, a bad copy or a hand edit would."""
    weights = ckpt / WEIGHTS
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:4096])
    elif kind == "zeroed":
        weights.write_bytes(bytes(weights.stat().st_size))
    elif kind == "missing":
        weights.unlink()
    elif kind == "config":
        (ckpt / CONFIG).write_text('{"model": {"d_model": 16,')
    elif kind == "header":
        data = bytearray(weights.read_bytes())
        data[8:16] = b"\xff" * 8  # the header's opening bytes: no longer JSON
        weights.write_bytes(bytes(data))
    return CONFIG if kind == "config" else WEIGHTS


DAMAGE = ["truncated", "zeroed", "missing", "config", "header"]


@pytest.mark.parametrize("kind", DAMAGE)
@pytest.mark.parametrize("command", ["eval", "generate", "serve", "resume"])
def test_damaged_checkpoint_is_one_line_naming_the_file(run_copy, capsys, kind, command):
    ckpt = newest(run_copy)
    name = _damage(ckpt, kind)
    argv = {
        "eval": ["eval", str(ckpt)],
        "generate": ["generate", str(ckpt), "--prompt", "0.1,0.2"],
        "serve": ["serve", str(ckpt), "--port", "0", "--device", "cpu"],
        "resume": train_args(run_copy, 8, f"--resume={ckpt}"),
    }[command]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and str(ckpt / name) in one_error(err)


@pytest.mark.parametrize("kind", DAMAGE)
def test_damage_without_a_manifest_is_still_one_line(run_copy, capsys, kind):
    ckpt = newest(run_copy)
    (ckpt / MANIFEST_FILE).unlink()  # as written before manifests existed
    name = _damage(ckpt, kind)
    code, _, err = run_cli(capsys, "eval", str(ckpt))
    assert code == 2 and str(ckpt / name) in one_error(err)


def test_resume_with_another_model_config_names_the_parameter_and_shapes(run_copy, capsys):
    code, _, err = run_cli(capsys, *train_args(run_copy, 8, "--resume", "--model.moe.n_experts=8"))
    line = one_error(err)
    assert code == 2 and "experts.w1 has shape [4, 16, 32] in the file, [8, 16, 32]" in line


def test_a_run_folder_in_use_by_another_run_is_refused(tmp_path, capsys):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".moekit.lock", "a+") as held:  # what a running `moekit train` holds
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        code, _, err = run_cli(capsys, *train_args(out, 2))
    assert code == 2 and "in use by another moekit run (pid 4242)" in one_error(err)
    assert not (out / "metrics.jsonl").exists()
    code, _, _ = run_cli(capsys, *train_args(out, 2))  # free again once that run ended
    assert code == 0
