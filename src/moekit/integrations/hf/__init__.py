"""Hugging Face interop: HF MoE checkpoints into moekit and back, and HF models run on moekit.

transformers and tokenizers are an optional extra (`pip install 'moekit[hf]'`), imported only
by the functions that need them.
"""

from moekit.integrations.hf.convert import hf_to_moekit, load_hf, moekit_to_hf, read_hf
from moekit.integrations.hf.experts import register
from moekit.integrations.hf.families import FAMILIES, UnsupportedCheckpoint
from moekit.integrations.hf.report import RoutingReport, routing_report
from moekit.model.tokenizer import TextTokenizer, load_tokenizer

__all__ = [
    "FAMILIES",
    "RoutingReport",
    "TextTokenizer",
    "UnsupportedCheckpoint",
    "hf_to_moekit",
    "load_hf",
    "load_tokenizer",
    "moekit_to_hf",
    "read_hf",
    "register",
    "routing_report",
]
