"""Persistent memory of expert insights: embeddings with the experts that handled them.

``KnowledgeStore`` keeps insights in SQLite, merges near-duplicates, links nodes that share
experts and answers exact cosine top-k queries; ``KnowledgeRecorder`` feeds it from MoE routing.
"""

from moekit.memory._schema import Hit, Node
from moekit.memory.recorder import KnowledgeRecorder, pool_routing
from moekit.memory.store import KnowledgeStore

__all__ = ["Hit", "KnowledgeRecorder", "KnowledgeStore", "Node", "pool_routing"]
