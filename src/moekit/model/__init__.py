"""Decoder-only MoE transformer: config, layers, KV caches, sampling, generation, model files."""

from moekit.model.cache import AttentionCache, KVCache
from moekit.model.config import ModelConfig
from moekit.model.generate import generate
from moekit.model.sampling import RowSampling, sample_next, sample_rows
from moekit.model.store import load, save_model_files
from moekit.model.transformer import ModelOutput, Transformer

__all__ = [
    "AttentionCache",
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "RowSampling",
    "Transformer",
    "generate",
    "load",
    "sample_next",
    "sample_rows",
    "save_model_files",
]
