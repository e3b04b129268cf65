"""The engine's configuration: built once from the user's arguments, frozen, checked at construction.

Every client of the engine core — `LLM.generate`, `Engine`, `magicdec serve`, the benchmarks — builds an
`EngineConfig` and gets a core from `EngineCore.from_config`. Speculation (`spec`) is part of it; changing it
between requests is `EngineCore.set_speculation`, which the core owns.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from magicdec.spec.config import SpecConfig

BLOCK_MULTIPLE = 64  # a KV block is a multiple of the CPU kernel's 64-slot key blocks


def _int(name: str, value: object, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer ≥ {low}{' (or None)' if optional else ''}, got {value!r}")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How the engine runs (see the `Engine` docstring for each knob).

    - `spec`: the engine's speculation (None or method "none": plain decoding).
    - `max_num_seqs` requests run at once; a step takes at most `max_num_batched_tokens` tokens (decoding
      requests' rounds first, then prompt chunks of `prefill_chunk` tokens).
    - The KV pool: `num_blocks` blocks of `block_size` tokens, or as many as `kv_cache_memory` bytes hold, or a
      share of the free memory (never more than `max_num_seqs` requests of `max_model_len` tokens need, or
      than requests of the `pool_lengths` need: an offline run that knows its requests).
    - `cuda_graphs`: replay decode-shaped forwards as CUDA graphs (None: on CUDA unless MAGICDEC_CUDA_GRAPHS=0);
      `pad_shapes`: run the graphs' padded shapes without capturing (what tests exercise on the CPU).
    - `release_windows`: on a model whose layers split into global and sliding groups (`layer_groups`), a
      sliding layer holds only the blocks of its window (a ring per request); prefix caching is then off.
    """

    spec: SpecConfig | None = None
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 1024
    prefill_chunk: int = 512
    block_size: int = BLOCK_MULTIPLE
    num_blocks: int | None = None
    kv_cache_memory: int | None = None
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    pool_lengths: tuple[int, ...] | None = None
    cuda_graphs: bool | None = None
    pad_shapes: bool = False
    release_windows: bool = True

    def __post_init__(self) -> None:
        if self.spec is not None and not isinstance(self.spec, SpecConfig):
            raise TypeError(f"spec must be a SpecConfig (or None), got {type(self.spec).__name__}: {self.spec!r:.80}")
        _int("max_num_seqs", self.max_num_seqs, 1)
        _int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _int("prefill_chunk", self.prefill_chunk, 1)
        _int("block_size", self.block_size, 1)
        _int("num_blocks", self.num_blocks, 1, optional=True)
        _int("kv_cache_memory", self.kv_cache_memory, 1, optional=True)
        _int("max_model_len", self.max_model_len, 1, optional=True)
        if self.block_size % BLOCK_MULTIPLE:
            raise ValueError(f"block_size must be a positive multiple of {BLOCK_MULTIPLE} tokens (the CPU kernel reads "
                             f"keys in {BLOCK_MULTIPLE}-slot blocks), got {self.block_size}")
        for name in ("enable_prefix_caching", "pad_shapes", "release_windows"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be True, False or None (automatic), got {self.cuda_graphs!r}")
        if self.pool_lengths is not None:
            object.__setattr__(self, "pool_lengths", tuple(self.pool_lengths))

    @property
    def speculating(self) -> bool:
        return self.spec is not None and self.spec.enabled
