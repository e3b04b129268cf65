"""Builds the drafter a `SpecConfig` asks for: which model drafts, over which cache, at what cost in bytes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from magicdec.cache.dense import DenseKVCache
from magicdec.cache.memory import kv_cache_bytes
from magicdec.cache.sparse import SparseKVCache
from magicdec.model.llama import Transformer
from magicdec.runtime.runner import ModelRunner
from magicdec.spec.config import SpecConfig
from magicdec.spec.drafter import Drafter


@dataclass(slots=True)
class DraftSetup:
    """A drafter's plan: the bytes its cache will take, and how to build it."""

    cache_bytes: int
    build: Callable[[], Drafter]


def plan_drafter(spec: SpecConfig, model: Transformer, forward: ModelRunner, batch: int, capacity: int,
                 vocab_size: int | None = None) -> DraftSetup:
    """The drafter for `batch` sequences of at most `capacity` positions: `model` (the target itself for
    self-speculation, else the draft model) run by `forward`; `vocab_size`: the target's. A budget larger
    than the sequences are long is cut to their length: a sparse cache never holds more slots than
    there are positions."""
    if spec.drafter == "guided":
        raise ValueError("the guided drafter reads blocks chosen by the verification's attention, which only the "
                         "serving engine's paged cache reports: use magicdec.Engine / magicdec serve, or another "
                         "drafter (streaming, snapkv) with LLM.generate")
    cfg, kv_heads = model.config, model.kv_heads
    slack = spec.gamma_bound + 2  # room for a round's drafts and the catch-up tokens of "own" mode

    if spec.drafter == "full":
        slots = capacity + 1

        def build() -> Drafter:
            cache = DenseKVCache(cfg.n_layers, batch, kv_heads, cfg.head_dim, capacity, cfg.group_size,
                                 model.dtype, model.device)
            return Drafter(model, cache, "own", forward=forward, vocab_size=vocab_size)
    else:
        n_kept, window = min(spec.n_kept, capacity), min(spec.recent_window, capacity)
        slots = n_kept + window + slack + 1
        tuning = spec.tuning

        def build() -> Drafter:
            cache = SparseKVCache(cfg.n_layers, batch, kv_heads, cfg.head_dim, n_kept, window, slack,
                                  cfg.group_size, model.dtype, model.device, sink_writes=spec.drafter == "streaming")
            return Drafter(model, cache, tuning.kv_source, spec.drafter, tuning.observe, tuning.pool_kernel, forward,
                           vocab_size)

    return DraftSetup(kv_cache_bytes(cfg, kv_heads, batch, slots, model.dtype), build)
