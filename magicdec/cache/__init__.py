"""KV caches: the paged pool of blocks read through block tables (`paged.py`), the pool's bookkeeping and
prefix cache (`blocks.py`), and the memory plan checked before anything is allocated (`memory.py`)."""

from magicdec.cache.memory import MemoryPlan, OutOfMemoryPlan, kv_cache_bytes

__all__ = ["MemoryPlan", "OutOfMemoryPlan", "kv_cache_bytes"]
