"""Parallelism: tensor parallelism over torch.distributed (`tp`)."""

from magicdec.parallel.tp import TensorParallel, check_shardable, init_from_env, shard_model

__all__ = ["TensorParallel", "check_shardable", "init_from_env", "shard_model"]
