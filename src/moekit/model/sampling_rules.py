"""Valid ranges of the sampling options: one source for `moekit generate` and the server's
request schema, so a value one refuses the other refuses too."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class Bound:
    """ge / gt / le limits of one option (None: no limit), as pydantic's `Field` takes them."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def field_kwargs(self) -> dict[str, float]:
        """The limits as keyword arguments of `pydantic.Field`."""
        return {
            k: v for k, v in (("ge", self.ge), ("gt", self.gt), ("le", self.le)) if v is not None
        }

    def problem(self, value: float) -> str | None:
        """What is wrong with `value` ('must be >= 1'), or None when it is inside."""
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        if self.ge is not None and not value >= self.ge:
            return f"must be >= {self.ge}"
        if self.gt is not None and not value > self.gt:
            return f"must be > {self.gt}"
        if self.le is not None and not value <= self.le:
            return f"must be <= {self.le}"
        return None


SAMPLING_BOUNDS = {
    "max_new_tokens": Bound(ge=1, le=INT_MAX),  # positions to generate
    "temperature": Bound(ge=0.0, le=1e4),  # 0 = greedy
    "top_k": Bound(ge=1, le=INT_MAX),
    "top_p": Bound(gt=0.0, le=1.0),  # nucleus probability mass
    "seed": Bound(ge=0, le=2**63 - 1),
}


def check_sampling(values: Mapping[str, Any], names: Mapping[str, str] | None = None) -> None:
    """Raise ValueError naming the first option outside its `SAMPLING_BOUNDS` (None: unset).

    `names` maps a field to what the caller calls it (e.g. 'max_new_tokens' -> '--max-new').
    """
    for field, value in values.items():
        if value is None:
            continue
        problem = SAMPLING_BOUNDS[field].problem(value)
        if problem is not None:
            raise ValueError(f"{(names or {}).get(field, field)}={value!r} {problem}")
