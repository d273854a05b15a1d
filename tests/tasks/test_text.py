import math

import pytest
import torch

from moekit.tasks import TaskConfig, build_task
from moekit.tasks.text import CATEGORIES, TextTask, byte_classes, stdlib_files


def test_corpus_is_stdlib_source_split_by_file():
    files = stdlib_files()
    assert any(p.name == "functools.py" for p in files)
    assert not any("site-packages" in p.parts or "test" in p.parts for p in files)
    task = build_task(TaskConfig(name="text", options={"max_bytes": 300_000, "val_every": 4}))
    train, val = (bytes(task.corpus[s].tolist()) for s in ("train", "val"))
    assert b"def " in train and b"def " in val
    # a held-out file (every 4th in sorted order) is in the val text, never in train
    held = next(files[i] for i in range(3, 40, 4) if files[i].stat().st_size > 8000)
    chunk = held.read_bytes()[4000:6000]
    assert chunk in val and chunk not in train


def test_batches_and_byte_categories():
    task = build_task(TaskConfig(name="text", seq_len=40, options={"max_bytes": 200_000}))
    batch = task.train_batch(0, 0, 4)
    assert batch.x.dtype == torch.long and batch.x.shape == (4, 40)
    assert torch.equal(batch.x[:, 1:], batch.y[:, :-1])
    table = byte_classes()
    assert CATEGORIES[table[ord("a")]] == "lower" and CATEGORIES[table[ord("\n")]] == "newline"
    assert CATEGORIES[table[ord("(")]] == "punct" and CATEGORIES[table[ord("7")]] == "digit"
    assert torch.equal(batch.category, table[batch.x])
    assert TextTask.decode(TextTask.encode("héllo")) == "héllo"


def test_loss_halves_in_a_short_run(tmp_path, train_briefly):
    task = TaskConfig(name="text", seq_len=64, val_sequences=32, options={"max_bytes": 400_000})
    _, before, after = train_briefly(tmp_path, task, steps=250, lr=1e-2)
    assert abs(before["bpb"] - math.log2(256)) < 0.3  # uniform over bytes at init
    assert after["val"]["val_loss"] <= 0.5 * before["val_loss"]
    assert after["val"]["bpb"] == pytest.approx(after["val"]["val_loss"] / math.log(2))
