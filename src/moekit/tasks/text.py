"""`text`: byte-level language modelling on the Python standard library's own source.

The corpus is every `.py` file under ``sysconfig.get_paths()["stdlib"]`` (test suites and
site-packages left out), then with `site_packages` those of the installed packages
(``purelib``), read in sorted order; every `val_every`-th file is held out, so
validation text comes from files never trained on. The metric is bits per byte. Each byte
is labelled with a character class, the categories routing is compared against.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moekit.model.task import Batch, Task, TaskConfig, register_task

CATEGORIES = ("lower", "upper", "digit", "space", "newline", "punct", "quote", "other")
_SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """Sorted .py files of the standard library (or under `root`), without test suites and
    site-packages."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [
        p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def byte_classes() -> Tensor:
    """[256] int64: the category index of every byte value."""
    table = torch.full((256,), CATEGORIES.index("other"), dtype=torch.long)
    for b in range(256):
        c = chr(b)
        if c.islower() and b < 128:
            table[b] = 0
        elif c.isupper() and b < 128:
            table[b] = 1
        elif c.isdigit():
            table[b] = 2
        elif c in " \t":
            table[b] = 3
        elif c == "\n":
            table[b] = 4
        elif c in "'\"":
            table[b] = 6
        elif 32 < b < 127:
            table[b] = 5
    return table


@dataclass
class TextOptions:
    """Options of `text`: how much of the standard library is read and how it is split."""

    max_bytes: int = 4_000_000  # cap on corpus bytes read (train + val)
    val_every: int = 20  # every Nth file (by sorted path) goes to validation
    site_packages: bool = False  # also the installed packages' sources, after the stdlib's

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"task.options.max_bytes={self.max_bytes} must be >= 1")
        if self.val_every < 2:
            raise ValueError(f"task.options.val_every={self.val_every} must be >= 2")


def load_corpus(cfg: TextOptions) -> dict[str, Tensor]:
    """{'train', 'val'}: uint8 byte tensors split by file, about cfg.max_bytes in total.

    Validation gets 1 / val_every of the byte budget, so both splits fill up even when the
    budget is small.
    """
    budget = {"val": cfg.max_bytes // cfg.val_every}
    budget["train"] = cfg.max_bytes - budget["val"]
    parts: dict[str, list[bytes]] = {"train": [], "val": []}
    used = {"train": 0, "val": 0}
    files = stdlib_files()
    if cfg.site_packages:
        files += stdlib_files(sysconfig.get_paths()["purelib"])  # paths below it: no site-packages
    for i, path in enumerate(files):
        split = "val" if i % cfg.val_every == cfg.val_every - 1 else "train"
        if used[split] >= budget[split]:
            if all(used[s] >= budget[s] for s in used):
                break
            continue
        data = path.read_bytes()
        parts[split].append(data)
        used[split] += len(data)
    return {
        k: torch.frombuffer(bytearray(b"\n".join(v)), dtype=torch.uint8) for k, v in parts.items()
    }


@register_task("text", options=TextOptions)
class TextTask(Task):
    """Next-byte prediction: x = bytes [t, t + S), y = bytes [t + 1, t + S + 1)."""

    categories = CATEGORIES
    metric = "bpb"

    def __init__(self, cfg: TaskConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.corpus = load_corpus(self.options)
        self.classes = byte_classes()
        for split, data in self.corpus.items():
            if len(data) <= cfg.seq_len + 1:
                raise ValueError(
                    f"task.options.max_bytes={self.options.max_bytes} leaves too little "
                    f"{split} text"
                )

    def model_fields(self) -> dict[str, int | None]:
        return {"vocab_size": 256, "d_in": None, "d_out": None}

    def make_batch(self, gen: torch.Generator, batch_size: int, split: str) -> Batch:
        data, S = self.corpus[split], self.cfg.seq_len
        starts = torch.randint(0, len(data) - S - 1, (batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(S + 1)  # [B, S+1]
        window = data[idx].long()
        return Batch(window[:, :-1], window[:, 1:], self.classes[window[:, :-1]])

    def metrics(self, out: Tensor, batch: Batch, task_loss: Tensor) -> dict[str, Tensor]:
        return {"bpb": task_loss.detach() / math.log(2)}  # nats per byte -> bits per byte

    @staticmethod
    def encode(text: str) -> Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    @staticmethod
    def decode(tokens: Tensor) -> str:
        return bytes(tokens.tolist()).decode("utf-8", errors="replace")
