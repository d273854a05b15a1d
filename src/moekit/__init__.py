"""moekit: Mixture-of-Experts layers, kernels, models, training and serving on PyTorch."""

from moekit import reference
from moekit.config import ExpertConfig, MoEConfig, RouterConfig
from moekit.experts import register_expert
from moekit.integrations.hf.convert import load_hf
from moekit.layer import MoE, MoEInfo
from moekit.model.store import load
from moekit.routing import register_router
from moekit.system import System, SystemConfig
from moekit.types import Routing

__version__ = "0.1.0"

__all__ = [
    "ExpertConfig",
    "MoE",
    "MoEConfig",
    "MoEInfo",
    "RouterConfig",
    "Routing",
    "System",
    "SystemConfig",
    "load",
    "load_hf",
    "reference",
    "register_expert",
    "register_router",
]
