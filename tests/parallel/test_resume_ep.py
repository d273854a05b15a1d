"""Expert-parallel training runs resume: bitwise at the same size, and at other sizes.

Checkpoints hold the single-process optimizer state (expert moments gathered), so the state a
rank resumes from is a slice of the dense one whatever `parallel.ep` wrote it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from tests.parallel.runs import E, quiet_trainer, tiny_ep_run

from moekit.model.store import checkpoint_name
from moekit.train import Trainer, read_log
from moekit.train.checkpoint import STATE_FILE, load_trainer_state


def _train_records(run_dir: Path) -> list[tuple]:
    return [
        (r["step"], r["loss"], r["grad_norm"]) for r in read_log(run_dir) if r["kind"] == "train"
    ]


def _expert_moments(trainer: Trainer, state: dict) -> dict[int, torch.Tensor]:
    """exp_avg of every stacked expert tensor in an optimizer state, by parameter index."""
    routed = {id(p) for n, p in trainer.model.named_parameters() if ".ffn.experts." in n}
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    experts = [i for i, p in enumerate(params) if id(p) in routed]  # w1 [E, D, 2H], w2 [E, H, D]
    return {i: state["state"][i]["exp_avg"] for i in experts}


def _full_then_resumed(rank: int, world: int, root: str) -> None:
    root_p = Path(root)
    full = quiet_trainer(tiny_ep_run(root_p / "full", ep=world))
    full.fit()
    full.close()
    mid = root_p / "full" / "checkpoints" / checkpoint_name(3)  # what a kill after step 3 leaves
    cut = quiet_trainer(tiny_ep_run(root_p / "cut", ep=world))
    cut.fit(resume=mid)
    cut.close()
    if rank == 0:
        want = [r for r in _train_records(root_p / "full") if r[0] > 3]
        assert _train_records(root_p / "cut") == want
    done, again = full.model.state_dict(), cut.model.state_dict()
    for key in done:
        assert torch.equal(done[key], again[key]), f"rank {rank}: {key} differs after resume"
    dist.barrier()


def test_ep2_run_resumes_bitwise_and_its_checkpoint_resumes_at_ep1(launch, tmp_path):
    launch(_full_then_resumed, 2, str(tmp_path))
    mid = tmp_path / "full" / "checkpoints" / checkpoint_name(3)
    saved = load_trainer_state(mid / STATE_FILE)["optimizer"]
    one = quiet_trainer(tiny_ep_run(tmp_path / "one", ep=1, batch_size=8))  # the same global batch
    moments = _expert_moments(one, saved)
    assert moments and all(
        m.shape[0] == E and (m.flatten(1).abs().sum(1) > 0).all() for m in moments.values()
    )

    one.restore(mid)
    assert one.step == 3
    loaded = _expert_moments(one, one.optimizer.state_dict())
    assert all(torch.equal(loaded[i], moments[i]) for i in moments)
    summary = one.fit()
    one.close()
    assert summary["step"] == 6
    assert all(torch.isfinite(torch.tensor(r[1])) for r in _train_records(tmp_path / "one"))


def _resume_at_ep4(rank: int, world: int, root: str) -> None:
    mid = Path(root) / "full" / "checkpoints" / checkpoint_name(3)
    four = quiet_trainer(tiny_ep_run(Path(root) / "four", ep=world, batch_size=2))
    saved = _expert_moments(four, load_trainer_state(mid / STATE_FILE)["optimizer"])
    four.restore(mid)
    local = _expert_moments(four, four.optimizer.state_dict())
    lo, L = rank * (E // world), E // world
    assert local and local.keys() == saved.keys()
    for i, got in local.items():
        assert torch.equal(got, saved[i][lo : lo + L]), f"rank {rank}: wrong expert rows"
    assert four.fit()["step"] == 6
    four.close()


def test_ep2_checkpoint_resumes_at_ep4(launch, tmp_path):
    launch(_full_then_resumed, 2, str(tmp_path))
    launch(_resume_at_ep4, 4, str(tmp_path))
