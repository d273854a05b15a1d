"""`Schedule`: a router option annealed from `start` to `end` over `steps` optimiser steps.

Written in a config as ``"2.0 -> 1.0 over 1000"`` (optionally ``"... cosine"``) or as a dict
of the fields. The trainer sets each scheduled option to `value(step)` before every step; the
option then holds `end` for good, which is what a checkpoint saved after the anneal serves with.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

SHAPES = ("linear", "cosine")
_TEXT = re.compile(
    r"^\s*(?P<start>\S+)\s*->\s*(?P<end>\S+)\s+over\s+(?P<steps>\d+)(?:\s+steps?)?"
    r"(?:\s+(?P<shape>linear|cosine))?\s*$"
)


@dataclass
class Schedule:
    """start -> end over `steps` steps (linear or half-cosine), held at `end` afterwards.

    `every` holds each value for that many steps: under torch.compile an option that is a
    Python number (the capacity factor) compiles once per distinct value.
    """

    start: float
    end: float
    steps: int
    shape: str = "linear"
    every: int = 1

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"schedule {name}={value!r} must be a number")
            if not math.isfinite(value):
                raise ValueError(f"schedule {name}={value!r} must be finite")
            setattr(self, name, float(value))
        for name in ("steps", "every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"schedule {name}={value!r} must be an integer >= 1")
        if self.shape not in SHAPES:
            raise ValueError(f"schedule shape={self.shape!r} is not one of {SHAPES}")

    def value(self, step: int) -> float:
        """The value before optimiser step `step` (0-based)."""
        held = step - step % self.every
        progress = min(1.0, max(0, held) / self.steps)
        if self.shape == "cosine":
            progress = 0.5 * (1.0 - math.cos(math.pi * progress))
        return self.start + (self.end - self.start) * progress

    @classmethod
    def parse(cls, value: Schedule | str | dict[str, Any], name: str) -> Schedule:
        """A schedule from its text form, a dict of fields or itself; ValueError naming `name`."""
        if isinstance(value, Schedule):
            return value
        try:
            if isinstance(value, str):
                match = _TEXT.match(value)
                if match is None:
                    raise ValueError("write it as 'START -> END over STEPS [linear|cosine]'")
                parts = match.groupdict()
                return cls(
                    float(parts["start"]),
                    float(parts["end"]),
                    int(parts["steps"]),
                    parts["shape"] or "linear",
                )
            if isinstance(value, dict):
                unknown = sorted(set(value) - {"start", "end", "steps", "shape", "every"})
                if unknown:
                    raise ValueError(f"unknown key(s) {', '.join(unknown)}")
                return cls(**value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}={value!r}: {err}") from None
        raise ValueError(f"{name}={value!r} must be a schedule string, a dict or a Schedule")

    def __str__(self) -> str:
        text = f"{self.start:g} -> {self.end:g} over {self.steps}"
        return text if self.shape == "linear" else f"{text} {self.shape}"
