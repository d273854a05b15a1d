"""The finance task's synthetic instruments, for the finance demo's tests."""

from tests.tasks.finance.conftest import garch_sim, small_universe  # noqa: F401
