import pytest
from tests.tiny import tiny_model

from moekit.train.checkpoint import save_checkpoint
from moekit.train.rundir import LOCK_FILE, claim_run_dir, is_locked, previous_run, run_lock


def _old_run(run_dir, step=40):
    save_checkpoint(run_dir / "checkpoints", tiny_model(0), None, step=step)
    (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')


def test_an_empty_or_missing_folder_is_free(tmp_path):
    assert claim_run_dir(tmp_path / "new", None, overwrite=False) is None
    (tmp_path / "plots").mkdir()
    assert previous_run(tmp_path) is None


def test_another_run_is_refused_and_its_resume_is_allowed(tmp_path):
    run = tmp_path / "run"
    _old_run(run)
    with pytest.raises(ValueError, match="step 40.*--resume.*--overwrite"):
        claim_run_dir(run, None, overwrite=False)
    assert claim_run_dir(run, run, overwrite=False) is None
    assert claim_run_dir(run, run / "checkpoints" / "step-0000040", overwrite=False) is None
    with pytest.raises(ValueError, match="contradict"):
        claim_run_dir(run, run, overwrite=True)
    with pytest.raises(ValueError, match="move it aside with --overwrite"):
        claim_run_dir(run, tmp_path / "elsewhere", overwrite=False)


def test_a_log_without_checkpoints_offers_only_overwrite(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"a metrics log") as refused:
        claim_run_dir(tmp_path, None, overwrite=False)
    assert "--resume" not in str(refused.value)


def test_overwrite_moves_each_old_run_to_its_own_sibling(tmp_path):
    run = tmp_path / "run"
    moved = []
    for step in (40, 60):
        _old_run(run, step)
        moved.append(claim_run_dir(run, None, overwrite=True))
    assert not run.exists() and len(set(moved)) == 2
    assert sorted(previous_run(m) for m in moved) == [
        "checkpoints up to step 40",
        "checkpoints up to step 60",
    ]


def test_only_the_main_process_moves(tmp_path):
    _old_run(tmp_path / "run")
    assert claim_run_dir(tmp_path / "run", None, overwrite=True, is_main=False) is None
    assert previous_run(tmp_path / "run") == "checkpoints up to step 40"


def test_the_lock_counts_while_held_not_while_its_file_is_left(tmp_path):
    assert not is_locked(tmp_path)
    with run_lock(tmp_path):
        assert is_locked(tmp_path)
        refused = pytest.raises(ValueError, match=r"in use by another moekit run \(pid \d+\)")
        with refused, run_lock(tmp_path):
            pass
    assert (tmp_path / LOCK_FILE).exists() and not is_locked(tmp_path)
