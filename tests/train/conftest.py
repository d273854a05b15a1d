import pytest
from tests.tiny import tiny_run

SCHEDULE = {"steps": 12, "batch_size": 8, "eval_interval": 4, "log_interval": 3}


@pytest.fixture
def make_run():
    """`tiny_run` on this directory's schedule (twelve steps, an eval every four); a test's
    keywords override any TrainConfig field."""
    return lambda out, **train: tiny_run(out, **{**SCHEDULE, **train})
