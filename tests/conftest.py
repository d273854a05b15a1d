"""Shared test settings: deterministic torch, a hypothesis profile that fits CI's 2 cores."""

import os

import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
settings.register_profile(
    "moekit", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("moekit")
