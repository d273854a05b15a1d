"""Decoder-only MoE transformer: config, layers, KV cache, generation and model files."""

from moekit.model.cache import KVCache
from moekit.model.config import ModelConfig
from moekit.model.generate import generate, sample_next
from moekit.model.io import load, save_model_files
from moekit.model.transformer import ModelOutput, Transformer

__all__ = [
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "Transformer",
    "generate",
    "load",
    "sample_next",
    "save_model_files",
]
