"""A writer killed with SIGKILL mid-loop leaves an intact store holding every committed add."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moekit.memory import KnowledgeStore

SRC = Path(__file__).resolve().parents[2] / "src"
WRITER = textwrap.dedent(
    """
    import sys, torch
    from moekit.memory import KnowledgeStore
    store = KnowledgeStore(sys.argv[1], dim=32)
    gen = torch.Generator().manual_seed(0)
    for step in range(1_000_000):
        x = torch.randn(32, generator=gen)
        if step % 5 == 4:
            ids = store.add_many(torch.randn(8, 32, generator=gen), [[step % 8]] * 8, steps=step)
        else:
            ids = [store.add(x, [step % 8, 9], layer=step % 3, step=step, metadata={"s": step})]
        print(*ids, flush=True)
    """
)


def test_sigkill_during_writes_loses_no_committed_row(tmp_path):
    path = tmp_path / "kb.sqlite"
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    err = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        env=env,
    )
    committed: list[int] = []
    try:
        while len(committed) < 150:
            line = proc.stdout.readline()
            if not line:
                proc.wait(timeout=30)
                err.close()
                stderr = (tmp_path / "stderr.txt").read_text()
                pytest.fail(f"writer exited early ({proc.returncode}): {stderr[-2000:]}")
            committed += [int(t) for t in line.split()]
        proc.send_signal(signal.SIGKILL)
        committed += [int(t) for line in proc.stdout for t in line.split()]
    finally:
        proc.kill()
        proc.wait(timeout=30)
        err.close()
    assert proc.returncode == -signal.SIGKILL

    con = sqlite3.connect(path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    with KnowledgeStore(path, dim=32) as s:
        assert len(s) >= len(set(committed))
        missing = [i for i in set(committed) if s.get(i) is None]
        assert missing == []
        s.add(torch.randn(32), [1])  # the store is writable again
        probe = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
        first = s.query_many(probe, top_k=5, track=False)
        n = len(s)
    with KnowledgeStore(path, dim=32) as s:
        assert len(s) == n
        assert s.query_many(probe, top_k=5, track=False) == first
