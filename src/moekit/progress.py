"""Progress of long commands: a rich bar on a terminal, one plain line per item otherwise.

Written to stderr, so a command's results on stdout stay clean to pipe.

    with progress("sweep", total=12) as advance:
        for point in points:
            ...
            advance(f"E=8 k=2")  # one item done; the text says which
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

Advance = Callable[[str], None]


@contextlib.contextmanager
def progress(description: str, total: int, mode: str = "auto") -> Iterator[Advance]:
    """Yields `advance(text)`, to call once per finished item. mode: auto, rich, plain, off."""
    if mode == "auto":
        mode = "rich" if sys.stderr.isatty() else "plain"
    if mode not in ("rich", "plain", "off"):
        raise ValueError(f"mode={mode!r} is not one of auto, rich, plain, off")
    if mode == "off":
        yield lambda text="": None
        return
    if mode == "plain":
        start, done = time.perf_counter(), [0]

        def line(text: str = "") -> None:
            done[0] += 1
            took = time.perf_counter() - start
            print(
                f"[{description}] {done[0]}/{total} {text} ({took:.0f} s)".replace("  ", " "),
                file=sys.stderr,
                flush=True,
            )

        yield line
        return
    bar = Progress(
        TextColumn(f"[bold]{description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[item]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    task = bar.add_task(description, total=total, item="")
    with bar:
        yield lambda text="": bar.update(task, advance=1, item=text)
