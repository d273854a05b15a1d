"""`moekit runs list | show | latest` over run directories written by hand with the store."""

import json
import os

import pytest
from tests.tiny import tiny_run

from moekit import cli
from moekit.commands.runs import find_runs, resolve_run
from moekit.model.store import RUN_FILE, write_checkpoint
from moekit.train.logging import LOG_FILE
from moekit.train.rundir import run_lock
from moekit.train.trainer import Trainer


def _run(root, name, model, steps_done, target, metrics=(), log_steps=None):
    """A run dir: run.json (train.steps=target), a metrics log, a checkpoint per `metrics`."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    info = {
        "task": "signals",
        "metric": "val_mse",
        "params": {"total": 123, "active": 45},
        "run": {"train": {"steps": target}},
    }
    (run_dir / RUN_FILE).write_text(json.dumps(info))
    records = [
        {"kind": "train", "step": s, "loss": 1.0 / s}
        for s in range(1, (log_steps or steps_done) + 1)
    ]
    records += [{"kind": "eval", "step": steps_done, "val_mse": min(metrics, default=9.0) + 0.5}]
    (run_dir / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    for i, metric in enumerate(metrics):
        step = steps_done * (i + 1) // len(metrics)
        write_checkpoint(run_dir / "checkpoints", model, step, metric)
    return run_dir


@pytest.fixture
def out(tmp_path, tiny_model):
    """moekit-out with a finished, an interrupted and a checkpoint-less run (oldest first)."""
    model = tiny_model()
    root = tmp_path / "moekit-out"
    runs = [
        _run(root, "done", model, 20, 20, metrics=(0.4, 0.25)),
        _run(root / "sweep", "half", model, 10, 40, metrics=(0.7,)),
        _run(root, "fresh", model, 3, 40),
    ]
    for age, run_dir in enumerate(reversed(runs)):  # "fresh" newest
        for here, _, files in os.walk(run_dir):
            for f in files:
                os.utime(os.path.join(here, f), (1e9 - age * 100, 1e9 - age * 100))
    return root


def _rows(capsys, *argv):
    assert cli.main(["runs", "list", *argv, "--json"]) == 0
    return {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}


def test_list_gives_status_steps_best_metric_and_checkpoints(out, capsys):
    rows = _rows(capsys, "--root", str(out))
    assert set(rows) == {"done", "sweep/half", "fresh"}
    done, half, fresh = rows["done"], rows["sweep/half"], rows["fresh"]
    assert (done["status"], done["steps"], done["checkpoints"]) == ("finished", 20, 2)
    assert (done["metric"], done["best"]) == ("val_mse", 0.25)
    assert (half["status"], half["steps"], half["best"]) == ("interrupted", 10, 0.7)
    assert (fresh["status"], fresh["steps"], fresh["checkpoints"]) == ("no checkpoints", 3, 0)
    assert fresh["best"] == 9.5  # from the eval record of the log
    assert done["size_bytes"] > half["size_bytes"] > fresh["size_bytes"] > 0


def test_steps_come_from_the_log_when_it_is_ahead_of_the_checkpoint(tmp_path, tiny_model, capsys):
    root = tmp_path / "out"
    _run(root, "r", tiny_model(), 10, 40, metrics=(0.5,), log_steps=17)
    assert _rows(capsys, "--root", str(root))["r"]["steps"] == 17


def test_a_run_holding_its_lock_is_running(out, capsys):
    with run_lock(out / "sweep" / "half"):
        assert _rows(capsys, "--root", str(out))["sweep/half"]["status"] == "running"
    # the lock file stays once its run ended: status no longer says running
    assert (out / "sweep" / "half" / ".moekit.lock").exists()
    assert _rows(capsys, "--root", str(out))["sweep/half"]["status"] == "interrupted"


def test_list_prints_a_table(out, capsys):
    assert cli.main(["runs", "list", "--root", str(out)]) == 0
    text = capsys.readouterr().out
    for word in ("done", "finished", "interrupted", "fresh", "val_mse 0.25"):
        assert word in text


def test_latest_prints_the_newest_run(out, capsys):
    assert cli.main(["runs", "latest", "--root", str(out)]) == 0
    assert capsys.readouterr().out == f"{out / 'fresh'}\n"


def test_show_gives_config_metrics_and_checkpoints(out, capsys):
    (out / "done" / "checkpoints" / "step-0000020" / "meta.json").write_text('{"step": 20}\n')
    assert cli.main(["runs", "show", "done", "--root", str(out)]) == 0
    text = capsys.readouterr().out
    assert "status: finished, steps: 20" in text
    assert "task=signals, metric=val_mse, params=123 (45 active), steps=20" in text
    assert "last train: step=20, loss=0.05" in text
    assert "last eval: step=20, val_mse=0.75" in text
    assert "step-0000010  step 10  metric 0.4  intact" in text
    assert "step-0000020  step 20  metric -  DAMAGED (" in text  # meta.json no longer its own


def test_an_unknown_run_is_one_line_exit_2(out, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["runs", "show", "nope", "--root", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown run 'nope'" in err and "sweep/half" in err


def test_a_missing_root_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["runs", "list", "--root", str(tmp_path / "none")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_the_word_latest_is_the_newest_run_under_moekit_out(out, monkeypatch):
    monkeypatch.chdir(out.parent)
    assert resolve_run("latest") == os.path.join("moekit-out", "fresh")
    assert resolve_run("some/path") == "some/path"
    assert find_runs(out)[0].name == "done"


def test_a_trained_run_is_finished_and_eval_reads_it_as_latest(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_run("moekit-out/sig", steps=4, batch_size=4, eval_interval=2, log_interval=2)
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.close()
    row = _rows(capsys)["sig"]
    assert (row["status"], row["steps"], row["metric"]) == ("finished", 4, "mse")
    assert row["best"] is not None and row["checkpoints"] >= 1
    assert cli.main(["eval", "latest"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoint"].startswith(os.path.join("moekit-out", "sig", "checkpoints"))


def test_latest_with_no_runs_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "moekit-out").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plot", "latest"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "moekit: error: no run directory under moekit-out\n"
