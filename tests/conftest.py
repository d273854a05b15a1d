"""Shared test settings: deterministic torch, a hypothesis profile that fits CI's 2 cores, and
the tiny model every test directory builds on."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from tests import tiny

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
settings.register_profile(
    "moekit", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("moekit")


@pytest.fixture(scope="session")
def tiny_cfg():
    """tiny_cfg(**overrides) -> ModelConfig of the shared tiny transformer."""
    return tiny.tiny_config


@pytest.fixture(scope="session")
def tiny_model():
    """tiny_model(seed=0, **overrides) -> a freshly initialised tiny Transformer."""
    return tiny.tiny_model
