"""Parallelism: tensor parallelism over torch.distributed (`tp.py`), and the watchdog that stops every
rank when one fails (`watchdog.py`)."""

from magicdec.parallel.tp import TensorParallel, check_shardable, init_from_env, shard_model

__all__ = ["TensorParallel", "check_shardable", "init_from_env", "shard_model"]
