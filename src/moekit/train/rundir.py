"""A run directory belongs to one run: a new run never lands on top of another's files.

Training into a directory that holds a run (checkpoints, a metrics log or its run.json) is
refused unless it resumes that run, or `overwrite` moves the old run aside to a timestamped
sibling directory. Nothing is ever deleted. While a run writes its directory it holds
OUT/.moekit.lock, which `moekit runs list` reads as running.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from moekit.model.store import RUN_FILE, list_checkpoints
from moekit.train.logging import LOG_FILE

LOCK_FILE = ".moekit.lock"


@contextlib.contextmanager
def run_lock(out: str | os.PathLike[str]) -> Iterator[None]:
    """Hold OUT/.moekit.lock while a run writes OUT: a second run into it is refused in one
    line instead of interleaving its log and checkpoints. Released when the process ends."""
    import fcntl  # POSIX only: imported where a run is trained or inspected

    path = os.path.join(out, LOCK_FILE)
    os.makedirs(out, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise ValueError(
                f"--out {out} is in use by another moekit run (pid {holder}): wait for it to "
                "end, or train into another --out"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_locked(run_dir: str | Path) -> bool:
    """Whether a live process holds run_dir's lock (the file itself outlives its run)."""
    import fcntl

    path = Path(run_dir) / LOCK_FILE
    if not path.exists():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def previous_run(run_dir: str | Path) -> str | None:
    """What of a run `run_dir` holds ('checkpoints up to step 60', 'a metrics log'), or None."""
    run_dir = Path(run_dir)
    ckpts = list_checkpoints(run_dir / "checkpoints")
    if ckpts:
        return f"checkpoints up to step {ckpts[-1]['step']}"
    for name, what in ((LOG_FILE, "a metrics log"), (RUN_FILE, "a run description")):
        if (run_dir / name).exists():
            return f"{what} ({name})"
    return None


def set_aside(run_dir: str | Path) -> Path:
    """Move `run_dir` to a free sibling `<name>.old-<YYYYmmdd-HHMMSS>[-n]`; return it."""
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = run_dir.with_name(f"{run_dir.name}.old-{stamp}"), 1
    while target.exists():
        target, n = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}"), n + 1
    os.rename(run_dir, target)  # same parent: a rename, never a copy
    return target


def claim_run_dir(
    run_dir: str | Path, resume: str | Path | None, overwrite: bool, is_main: bool = True
) -> Path | None:
    """Make `run_dir` this run's own; returns where an old run was moved, if one was.

    A ValueError says what the directory holds and offers `--resume` / `--overwrite`.
    Resuming the run it holds is allowed; only the main process (`is_main`) moves anything.
    """
    run_dir = Path(run_dir)
    resuming_here = resume is not None and _inside(Path(resume), run_dir)
    if resuming_here and overwrite:
        raise ValueError(f"--resume {resume} and --overwrite contradict: pick one")
    held = previous_run(run_dir)
    if held is None or resuming_here:
        return None
    if not overwrite:
        offer = "continue it with --resume, or " if resume is None and "step" in held else ""
        raise ValueError(
            f"{run_dir} already holds another run ({held}): {offer}move it aside with "
            "--overwrite, or train into another --out"
        )
    return set_aside(run_dir) if is_main else None


def _inside(path: Path, run_dir: Path) -> bool:
    path, run_dir = path.resolve(), run_dir.resolve()
    return path == run_dir or run_dir in path.parents
