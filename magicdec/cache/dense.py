"""The target's full KV cache: one slot per position, preallocated for the whole batch.

Buffers are [layers, batch, kv_heads, capacity + 1, head_dim]; the extra last slot is a trash slot
that padding tokens write to and that no query ever sees. A token at position p lives in slot p, so
the cache needs no per-sequence length of its own: a query at position p sees slots 0..p, which
makes rollback free (rejected tokens' slots are simply overwritten later) and lets sequences of
one batch have any lengths and advance by different amounts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from magicdec.model.attention import MAX_DECODE_TOKENS, AttentionMask, attend

if TYPE_CHECKING:
    from magicdec.model.llama import Transformer

# observer(layer, q [B, Hq, T, D], k [B, Hkv, S, D], mask) is called on each attention (SnapKV).
Observer = Callable[[int, torch.Tensor, torch.Tensor, AttentionMask], None]


def store(buf: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor) -> None:
    """buf.scatter_(dim, index, src). 16-bit values move as int16 bit patterns: the same bits, and on the
    CPU far faster than PyTorch's bf16/fp16 scatter into a long cache."""
    if buf.dtype in (torch.bfloat16, torch.float16) and not buf.is_cuda:
        buf, src = buf.view(torch.int16), src.view(torch.int16)
    buf.scatter_(dim, index, src)


class DenseKVCache:
    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        capacity: int,
        group: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (n_layers, batch, n_kv_heads, capacity + 1, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.group = group
        self.observer: Observer | None = None
        self.read_only = False  # attend without storing (re-reading positions already cached)

    @classmethod
    def for_model(cls, model: Transformer, batch: int, capacity: int) -> DenseKVCache:
        """A cache shaped for `model`'s (possibly sharded) KV heads, in its dtype and on its device."""
        cfg = model.config
        return cls(cfg.n_layers, batch, model.kv_heads, cfg.head_dim, capacity, cfg.group_size, model.dtype,
                   model.device)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def begin(self, positions: torch.Tensor) -> DenseStep:
        return DenseStep(self, positions)

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at `positions` [B, N] (-1 reads the trash slot): [L, B, Hkv, N, D] each."""
        rows = positions.shape[0]
        slots = torch.where(positions >= 0, positions, self.capacity)
        L, _, H, _, D = self.k.shape
        idx = slots[None, :, None, :, None].expand(L, rows, H, -1, D)
        return self.k[:, :rows].gather(3, idx), self.v[:, :rows].gather(3, idx)

    def compact(self, keep: list[int]) -> None:
        """Move rows `keep` (ascending) to the front, in place; the other rows are dropped."""
        for dst, src in enumerate(keep):
            if dst != src:
                self.k[:, dst].copy_(self.k[:, src])
                self.v[:, dst].copy_(self.v[:, src])

    def copy_(self, other: DenseKVCache) -> None:
        """Take `other`'s contents (same shape), keeping this cache's buffers."""
        self.k.copy_(other.k)
        self.v.copy_(other.v)

    def clone(self) -> DenseKVCache:
        other = object.__new__(DenseKVCache)
        other.k, other.v = self.k.clone(), self.v.clone()
        other.capacity, other.group, other.observer, other.read_only = self.capacity, self.group, None, False
        return other


class DenseStep:
    """One forward's view of the cache: write slots and the causal visibility, shared by all layers.

    Decode-shaped blocks on CUDA attend over the whole buffer (static shapes, no host read: the
    kernel stops at each sequence's last position); elsewhere the keys are sliced to the furthest
    position of the block."""

    def __init__(self, cache: DenseKVCache, positions: torch.Tensor) -> None:
        self.cache = cache
        self.rows = positions.shape[0]
        self.slots = torch.where(positions >= 0, positions, cache.capacity)
        if positions.is_cuda and positions.shape[1] <= MAX_DECODE_TOKENS:
            self.kv_len = cache.capacity
        else:
            max_pos = int(positions.max())
            if max_pos >= cache.capacity:
                raise ValueError(f"position {max_pos} is beyond the KV cache capacity of {cache.capacity} tokens")
            self.kv_len = max_pos + 1
        self.mask = AttentionMask(cache.group, cache.k.dtype, positions, self.kv_len, rows_hint=cache.batch)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        K, V = self.cache.k[layer, : self.rows], self.cache.v[layer, : self.rows]
        if not self.cache.read_only:
            idx = self.slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            store(K, 2, idx, k)
            store(V, 2, idx, v)
        K, V = K[:, :, : self.kv_len], V[:, :, : self.kv_len]
        if self.cache.observer is not None:
            self.cache.observer(layer, q, K, self.mask)
        return attend(q, K, V, self.mask)
