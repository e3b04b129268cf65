"""The draft's sparse KV cache: a fixed budget of slots per sequence, whatever the context length.

Layout per sequence: `n_kept` slots that stay visible (StreamingLLM's attention sinks, or the prompt
positions SnapKV selected), then a ring of `window + slack` slots holding the most recent tokens, of
which a query at position p sees those at positions p - window + 1 .. p. The slack (≥ γ + 1) lets a
speculation round write ahead and roll back without losing window entries. Each slot is tagged with
the position it holds (-1: empty); masks are computed from the tags, so rollback only needs the
caller to stop counting rejected positions.
Keys are stored rotated at their original positions and keep their true distance to the queries.
"""

from __future__ import annotations

import torch

from magicdec.cache.dense import DenseKVCache, store
from magicdec.model.attention import AttentionMask, attend


class SparseKVCache:
    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        n_kept: int,
        window: int,
        slack: int,
        group: int,
        dtype: torch.dtype,
        device: torch.device | str,
        sink_writes: bool = True,
    ) -> None:
        if window < 1 or slack < 1 or n_kept < 0:
            raise ValueError(f"sparse cache needs window ≥ 1 and slack ≥ 1, got window={window} slack={slack}")
        self.n_kept, self.window, self.ring = n_kept, window, window + slack
        self.n_slots = n_kept + self.ring
        shape = (n_layers, batch, n_kv_heads, self.n_slots + 1, head_dim)  # + trash slot
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.tags = torch.full((batch, self.n_slots + 1), -1, dtype=torch.long, device=device)
        self.group, self.sink_writes = group, sink_writes

    @property
    def slack(self) -> int:
        return self.ring - self.window

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def slot_of(self, positions: torch.Tensor) -> torch.Tensor:
        """Slot of each position (-1 → the trash slot)."""
        ring = self.n_kept + positions.clamp(min=0) % self.ring
        slot = torch.where(positions < self.n_kept, positions, ring) if self.sink_writes else ring
        return torch.where(positions >= 0, slot, self.n_slots)

    def visible(self, query_pos: torch.Tensor, tags: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """[B, T, S]: which keys (tagged with their positions, [B, S]) each query sees: `kept` ones
        ([S] or [B, S]) up to its own position, the others only inside its window."""
        q = query_pos[..., None]
        t = tags[:, None, :]
        return (t >= 0) & (t <= q) & (kept[..., None, :] | (t > q - self.window))

    def tag(self, slots: torch.Tensor, positions: torch.Tensor) -> None:
        """Record which position each of rows' `slots` [B, N] now holds (-1: empty); the trash slot
        stays empty whatever padding wrote there."""
        self.tags[: slots.shape[0]].scatter_(1, slots, positions)
        self.tags[:, self.n_slots] = -1

    def kept_slots(self) -> torch.Tensor:
        kept = torch.zeros(self.n_slots, dtype=torch.bool, device=self.tags.device)
        kept[: self.n_kept] = True
        return kept

    def begin(self, positions: torch.Tensor) -> SparseStep:
        return SparseStep(self, positions)

    # ---- filling from the target cache ---------------------------------------------------------
    def write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Store k, v [L, B, Hkv, N, D] at `positions` [B, N] (-1: skip) and tag their slots.
        Positions of one row must map to distinct slots (N ≤ ring size)."""
        rows = positions.shape[0]
        slots = self.slot_of(positions)
        idx = slots[None, :, None, :, None].expand(k.shape[0], rows, k.shape[2], -1, k.shape[4])
        store(self.k[:, :rows], 3, idx, k)
        store(self.v[:, :rows], 3, idx, v)
        self.tag(slots, positions)

    def copy_from(self, target: DenseKVCache, positions: torch.Tensor) -> None:
        """Copy the target's K/V at `positions` [B, N] into this cache (-1 entries: clear tag only)."""
        k, v = target.gather(positions)
        self.write(k, v, positions)

    def set_kept(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> None:
        """Fill the kept region with k, v [L, B, Hkv, n_kept, D] (keys rotated at their original
        positions, which may differ per layer and head); `valid` [B, n_kept] marks filled slots."""
        rows = valid.shape[0]
        self.k[:, :rows, :, : self.n_kept] = k
        self.v[:, :rows, :, : self.n_kept] = v
        # kept slots are visible to every later query: tag 0 (or -1 if empty)
        self.tags[:rows, : self.n_kept] = torch.where(valid, 0, -1)

    def reset(self) -> None:
        self.tags.fill_(-1)

    def compact(self, keep: list[int]) -> None:
        for dst, src in enumerate(keep):
            if dst != src:
                self.k[:, dst].copy_(self.k[:, src])
                self.v[:, dst].copy_(self.v[:, src])
                self.tags[dst].copy_(self.tags[src])


class SparseStep:
    """One forward over the sparse cache. Short blocks (≤ slack tokens: drafting) are written into
    the ring first and attend over the cache; longer blocks (a windowed prefill chunk) attend over
    the cache plus themselves, then keep only what future queries can still see."""

    def __init__(self, cache: SparseKVCache, positions: torch.Tensor) -> None:
        self.cache = cache
        self.rows, T = positions.shape
        self.positions = positions
        query_pos = positions.clamp(min=0)
        self.in_place = T <= cache.slack
        tags = cache.tags[: self.rows]
        if self.in_place:
            self.slots = cache.slot_of(positions)
            cache.tag(self.slots, positions)
            self.mask = AttentionMask(cache.group, cache.k.dtype, positions, cache.n_slots,
                                      key_pos=tags[:, : cache.n_slots], window=cache.window, n_kept=cache.n_kept,
                                      rows_hint=cache.k.shape[1])
        else:
            keep = positions > positions.max(dim=1, keepdim=True).values - cache.ring
            if cache.sink_writes:
                keep |= positions < cache.n_kept
            self.slots = cache.slot_of(torch.where(keep, positions, -1))
            new_kept = (positions < cache.n_kept) & cache.sink_writes
            # entries at or past the block's first position are stale (drafts rejected since): the block rewrites them
            first = torch.where(positions >= 0, positions, torch.iinfo(torch.long).max).min(dim=1, keepdim=True).values
            old = tags[:, : cache.n_slots]
            allowed = torch.cat(
                [
                    cache.visible(query_pos, torch.where(old < first, old, -1), cache.kept_slots()),
                    cache.visible(query_pos, positions, new_kept),
                ],
                dim=2,
            )
            allowed[..., 0] |= positions < 0  # padding queries see slot 0
            cache.tag(self.slots, torch.where(keep, positions, -1))
            self.mask = AttentionMask(cache.group, cache.k.dtype, positions, allowed.shape[2], allowed=allowed)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c = self.cache
        K, V = c.k[layer, : self.rows], c.v[layer, : self.rows]
        idx = self.slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        if self.in_place:
            store(K, 2, idx, k)
            store(V, 2, idx, v)
            keys, values = K[:, :, : c.n_slots], V[:, :, : c.n_slots]
        else:
            keys = torch.cat([K[:, :, : c.n_slots], k], dim=2)
            values = torch.cat([V[:, :, : c.n_slots], v], dim=2)
        out = attend(q, keys, values, self.mask)
        if not self.in_place:
            store(K, 2, idx, k)
            store(V, 2, idx, v)
        return out

