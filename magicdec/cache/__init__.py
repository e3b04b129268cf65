"""KV caches: the target's dense cache and the draft's fixed-budget sparse cache."""

from magicdec.cache.dense import DenseKVCache
from magicdec.cache.memory import MemoryPlan, OutOfMemoryPlan, kv_cache_bytes
from magicdec.cache.sparse import SparseKVCache

__all__ = ["DenseKVCache", "MemoryPlan", "OutOfMemoryPlan", "SparseKVCache", "kv_cache_bytes"]
